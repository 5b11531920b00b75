"""cluster.yaml: Ray's own launcher validation accepts it (nothing is launched), and it keeps the rules that make
it safe: token authentication from a secret store, private subnets and a security group that admits SSH from
one named CIDR, separate least-privilege instance profiles, no local clutter synced, locked dependencies and an
image pinned by digest."""

import copy
import json
import re
import tomllib
from importlib.metadata import version

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import REPO

AWS = REPO / "configs" / "aws"
LOCK = REPO / "configs" / "cluster-lock.txt"
SECRET_ID = "gunsound/ray-auth-token"


@pytest.fixture
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def _policy(name: str) -> list[dict]:
    return json.loads((AWS / name).read_text())["Statement"]


def _actions(statements: list[dict]) -> set[str]:
    return {a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}


def _resources(statement: dict) -> list[str]:
    return [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]


def test_cluster_yaml_is_valid_for_the_launcher(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))
    broken = copy.deepcopy(cluster)
    broken["rsync_exclude"] = ".venv"  # the schema wants a list: the validator does check
    with pytest.raises(Exception, match="is not of type 'array'"):
        validate_config(prepare_config(broken))


def test_cluster_yaml_follows_the_project_rules(cluster):
    assert any(opt.startswith("--shm-size=") for opt in cluster["docker"]["run_options"])
    workers = cluster["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["node_config"]["InstanceType"].startswith(("g5.", "g6."))
    assert cluster["available_node_types"]["head"]["resources"] == {"CPU": 0}
    for node in cluster["available_node_types"].values():
        assert node["node_config"]["ImageId"].startswith("ami-")  # explicit AMI
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])


def test_the_image_is_rays_own_release_pinned_by_digest(cluster):
    match = re.fullmatch(r"rayproject/ray:(?P<ray>[\d.]+)-py311-gpu@sha256:[0-9a-f]{64}", cluster["docker"]["image"])
    assert match, cluster["docker"]["image"]
    assert match["ray"] == ray.__version__  # the Ray the project is tested with


def test_every_node_authenticates_with_a_token_from_the_secret_store(cluster):
    assert "--env RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cluster[key] if "ray start" in c]
        assert starts and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), key
    setup = " && ".join(cluster["setup_commands"])  # runs on the head and on every worker
    assert "secretsmanager" in setup and f"SecretId='{SECRET_ID}'" in setup
    assert "> ~/.ray/auth_token" in setup and "umask 077" in setup and "test -s ~/.ray/auth_token" in setup
    assert cluster["setup_commands"].index(next(c for c in cluster["setup_commands"] if "auth_token" in c)) > 0
    text = (REPO / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN" not in text and "aws_access_key_id" not in text.lower() and "aws_secret" not in text.lower()
    secret_arn = f"arn:aws:secretsmanager:{cluster['provider']['region']}:ACCOUNT_ID:secret:{SECRET_ID}-*"
    for policy in ("head-policy.json", "worker-policy.json"):  # both profiles can read the token, nothing else
        reads = [s for s in _policy(policy) if "secretsmanager:GetSecretValue" in _actions([s])]
        assert [_resources(s) for s in reads] == [[secret_arn]]
        assert not any(a.startswith("secretsmanager:") and a != "secretsmanager:GetSecretValue"
                       for a in _actions(_policy(policy)))


def test_nodes_sit_in_private_subnets_behind_a_group_that_admits_ssh_from_one_named_cidr(cluster):
    assert cluster["provider"]["use_internal_ips"] is True
    groups = set()
    for name, node in cluster["available_node_types"].items():
        conf = node["node_config"]
        assert conf["SubnetIds"] and all(s.startswith("subnet-") for s in conf["SubnetIds"]), name
        assert len(conf["SecurityGroupIds"]) == 1, name
        groups.add(conf["SecurityGroupIds"][0])
    assert len(groups) == 1  # one group for the whole cluster, so its self rule covers every node
    rules = json.loads((AWS / "security-group-ingress.json").read_text())
    for rule in rules:
        if rule.get("IpRanges") or rule.get("Ipv6Ranges"):  # anything open to addresses is SSH from ADMIN_CIDR
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
            assert [r["CidrIp"] for r in rule["IpRanges"]] == ["ADMIN_CIDR"] and not rule.get("Ipv6Ranges")
        else:  # the rest: only from the cluster's own group
            assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == ["SECURITY_GROUP_ID"]
    assert any(rule.get("FromPort") == 22 for rule in rules)
    assert "0.0.0.0/0" not in json.dumps(rules) and "::/0" not in json.dumps(rules)


def test_head_and_workers_have_separate_least_privilege_profiles(cluster):
    nodes = cluster["available_node_types"]
    assert nodes["head"]["node_config"]["IamInstanceProfile"] == {"Name": "gunsound-ray-head"}
    for name in ("gpu_worker", "cpu_worker"):
        assert nodes[name]["node_config"]["IamInstanceProfile"] == {"Name": "gunsound-ray-worker"}
    head, worker = _policy("head-policy.json"), _policy("worker-policy.json")
    for statements in (head, worker):
        assert all(s["Effect"] == "Allow" and "*" not in _actions([s]) for s in statements)
        assert not any(a.endswith(":*") for a in _actions(statements))
    # Workers: the run buckets and the token, nothing else.
    assert {a.split(":")[0] for a in _actions(worker)} == {"s3", "secretsmanager"}
    # The head: launch and terminate this cluster's workers, pass the worker role only.
    assert {"ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole"} <= _actions(head)
    assert {a.split(":")[0] for a in _actions(head)} == {"ec2", "iam", "s3", "secretsmanager"}
    cluster_tag = {"ec2:ResourceTag/ray-cluster-name": cluster["cluster_name"]}
    for s in head:
        if "ec2:TerminateInstances" in _actions([s]):
            assert s["Condition"] == {"StringEquals": cluster_tag}
        if "iam:PassRole" in _actions([s]):
            assert _resources(s) == ["arn:aws:iam::ACCOUNT_ID:role/gunsound-ray-worker"]
        if any(a.startswith("ec2:") and not a.startswith("ec2:Describe") for a in _actions([s])):
            assert all(":ec2:" in r for r in _resources(s))
        if any(a.startswith("ec2:Describe") for a in _actions([s])):
            assert all(a.startswith("ec2:Describe") for a in _actions([s]))  # only reads go to Resource "*"
    # S3: the data and runs buckets only, the data read-only, on both profiles alike.
    for statements in (head, worker):
        s3 = [s for s in statements if any(a.startswith("s3:") for a in _actions([s]))]
        assert {r for s in s3 for r in _resources(s)} == {
            "arn:aws:s3:::DATA_BUCKET", "arn:aws:s3:::RUNS_BUCKET", "arn:aws:s3:::DATA_BUCKET/*",
            "arn:aws:s3:::RUNS_BUCKET/*"}
        data = [s for s in s3 if "arn:aws:s3:::DATA_BUCKET/*" in _resources(s)]
        assert _actions(data) == {"s3:GetObject"}
    assert json.loads((AWS / "ec2-trust-policy.json").read_text())["Statement"][0]["Principal"] == {
        "Service": "ec2.amazonaws.com"}


def test_only_the_source_is_synced_to_the_nodes(cluster):
    assert cluster["file_mounts"] == {"/home/ray/gunsound": "."}
    assert {"/.venv", "/data", "/outputs"} <= set(cluster["rsync_exclude"])


def test_nodes_install_the_locked_versions_then_the_project_without_resolving(cluster):
    installs = [c for c in cluster["setup_commands"] if "pip install" in c]
    assert installs == ["pip install --quiet -r /home/ray/gunsound/configs/cluster-lock.txt"
                        " && pip install --quiet --no-deps /home/ray/gunsound"]
    assert " -e " not in " ".join(cluster["setup_commands"])


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned and " " not in pinned and ";" not in pinned, f"{LOCK.name}: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = pinned
    return pins


def test_the_lock_pins_every_dependency_at_the_version_tested_here():
    pins = _pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is a dependency but not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {spec!r}"
    differ = {name: (pinned, version(name)) for name, pinned in pins.items() if version(name) != pinned}
    assert not differ, f"{LOCK.name} pins versions other than those installed (lock, installed): {differ}"
