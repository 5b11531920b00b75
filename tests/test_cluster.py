"""cluster.yaml passes Ray's own cluster-launcher schema validation (nothing is launched)."""

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO


@pytest.fixture
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_valid_for_the_launcher(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_yaml_follows_the_project_rules(cluster):
    assert cluster["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    assert any(opt.startswith("--shm-size=") for opt in cluster["docker"]["run_options"])
    workers = cluster["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert cluster["available_node_types"]["head"]["resources"] == {"CPU": 0}
    for node in cluster["available_node_types"].values():
        assert node["node_config"]["ImageId"].startswith("ami-")  # explicit AMI
        assert "IamInstanceProfile" in node["node_config"]  # S3 through an instance profile
    text = (REPO / "cluster.yaml").read_text()
    assert "aws_access_key_id" not in text.lower() and "aws_secret" not in text.lower()
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])
    assert cluster["provider"]["use_internal_ips"] is True
