"""S3 for real: moto's S3 server on loopback, through the same pyarrow/boto3 code paths as AWS."""

import json

import boto3
import numpy as np
import pytest
import yaml

from gunsound import storage
from gunsound.cli import main
from gunsound.inference import load_model_files
from gunsound.model import ModelArtifact
from gunsound.model_files import describe_model, model_files
from tests.conftest import train_args


@pytest.fixture(scope="module")
def bucket(s3_server, synth_dir):
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="gunsound-test")
    for f in synth_dir.rglob("*"):
        if f.is_file():
            client.upload_file(str(f), "gunsound-test", "datasets/synth/" + f.relative_to(synth_dir).as_posix())
    return client


def test_storage_layer_lists_reads_and_writes_s3(s3_server, bucket):
    storage.configure_s3(s3_server)
    files = storage.list_files("s3://gunsound-test/datasets/synth")
    assert "s3://gunsound-test/datasets/synth/train.pq" in files
    storage.write_text("s3://gunsound-test/scratch/a.txt", "hello")
    assert storage.read_text("s3://gunsound-test/scratch/a.txt") == "hello"
    assert not storage.exists("s3://gunsound-test/scratch/b.txt")


@pytest.mark.parametrize("recursive", [True, False])
def test_an_s3_prefix_is_listed_a_page_at_a_time_as_arrow_lists_it_whole(s3_server, bucket, recursive):
    import pyarrow.fs as pafs

    storage.configure_s3(s3_server)
    keys = ["listing/a.wav", "listing/b.ogg", "listing/notes.txt", "listing/sub/c.wav", "listing/sub/deeper/d.wav",
            "listing/sub2/", "listing/z.wav"]
    for key in keys:
        bucket.put_object(Bucket="gunsound-test", Key=key, Body=b"" if key.endswith("/") else b"x" * len(key))
    pages = list(storage.entry_pages("s3://gunsound-test/listing", recursive, page_entries=2))
    assert len(pages) >= 3  # one ListObjectsV2 request a page, continued by token
    fs, path = storage.resolve("s3://gunsound-test/listing")
    whole = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    expected = sorted(("s3://" + info.path, info.type, info.size if info.type == pafs.FileType.File else None)
                      for info in whole)
    paged = sorted((uri, info.type, info.size if info.type == pafs.FileType.File else None)
                   for page in pages for uri, info in page)
    assert paged == expected
    assert list(storage.entry_pages("s3://gunsound-test/nothing-here")) == []
    with pytest.raises(FileNotFoundError, match=r"listing s3://no-such-bucket/x: .*NoSuchBucket"):
        list(storage.entry_pages("s3://no-such-bucket/x"))


def test_a_local_folder_is_listed_a_folder_at_a_time_with_its_broken_links(tmp_path):
    import os

    for rel in ["a.wav", "sub/b.wav", "sub/deeper/c.wav", "sub2/d.wav", "z.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    os.symlink(tmp_path / "gone.wav", tmp_path / "sub" / "dangling.wav")
    pages = list(storage.entry_pages(str(tmp_path), page_entries=3))
    assert [len(page) for page in pages] == [3, 3, 3]
    listed = [uri for page in pages for uri, _ in page]
    assert sorted(listed) == sorted(str(tmp_path / rel) for rel in [
        "a.wav", "sub", "sub/b.wav", "sub/dangling.wav", "sub/deeper", "sub/deeper/c.wav", "sub2", "sub2/d.wav",
        "z.txt"]) and len(listed) == 9
    kinds = {uri.removeprefix(str(tmp_path) + "/"): info.type.name for page in pages for uri, info in page}
    assert kinds["sub/dangling.wav"] == "NotFound" and kinds["sub/deeper"] == "Directory"


def test_zip_on_s3_is_read_in_place(s3_server, bucket, synth_dir, tmp_path):
    from gunsound import audio
    from gunsound.config import load_config
    from gunsound.dataset import load_manifest
    from tests.conftest import SEED_CONFIG, zip_folder

    storage.configure_s3(s3_server)
    archive = zip_folder(synth_dir, tmp_path / "Gun_sound_detection.zip")
    bucket.upload_file(str(archive), "gunsound-test", "zips/Gun sound detection.zip")
    cfg = load_config(SEED_CONFIG, ["architecture.pretrained=false"])
    manifest = load_manifest(cfg, "s3://gunsound-test/zips/Gun sound detection.zip")
    assert len(manifest.frame) == 95
    row = manifest.frame.iloc[-1]
    assert row["path"].startswith("zip://s3://gunsound-test/zips/Gun sound detection.zip!/Gun_sound_detection/")
    from_s3_zip, _ = audio.read(row["path"], 48000)
    original, _ = audio.read(str(synth_dir / "Gun_Classifier" / row["rel_path"]), 48000)
    np.testing.assert_array_equal(from_s3_zip, original)


def test_pretrained_weights_from_s3_leave_no_local_copy(s3_server, bucket, tmp_path, monkeypatch):
    import tempfile

    import timm
    import torch

    from gunsound.config import ArchitectureConfig
    from gunsound.model import build_model

    storage.configure_s3(s3_server)
    imagenet = timm.create_model("resnet18", pretrained=False, num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    bucket.upload_file(str(tmp_path / "resnet18.pth"), "gunsound-test", "weights/resnet18.pth")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))     # where the download goes, to look at it after
    arch = ArchitectureConfig(backbone="resnet18", pretrained=True,
                              pretrained_weights="s3://gunsound-test/weights/resnet18.pth")
    model = build_model(arch, 9)
    torch.testing.assert_close(model.backbone.conv1.weight, imagenet.conv1.weight.sum(dim=1, keepdim=True))
    assert list(scratch.iterdir()) == []                       # the downloaded copy is removed once loaded


# Every training option at once: one run serves this and the S3 round trip (each run costs a Ray Train start).
EVERY_OPTION = ["training.epochs=2", "training.grad_accumulation=2", "training.gradient_clip=0.5",
                "training.drop_last_batch=false", "training.evaluation_epochs=2", "training.save_best_checkpoint=true",
                "training.calculate_train_metric=true", "training.differential_learning_rate_layers=[backbone]",
                "training.warmup_epochs=1", "augmentation.mix_audio=Mixup", "augmentation.mix_probability=0.5",
                "augmentation.time_mask_frames=8", "augmentation.frequency_mask_bins=4", "environment.seed=-1",
                "environment.mixed_precision_training=true",
                "environment.shard_cache_mb=0"]  # stream the shard every epoch (the other runs hold it in memory)


@pytest.mark.ray
def test_train_from_s3_with_every_option_writes_outputs_to_s3(ray_local, s3_server, bucket, capsys):
    run = "s3://gunsound-test/runs/laptop"
    code = main(train_args("s3://gunsound-test/datasets/synth", run, "--set", f"storage.endpoint_url={s3_server}",
                           *[arg for kv in EVERY_OPTION for arg in ("--set", kv)]))
    assert code == 0, capsys.readouterr().err
    keys = {o["Key"] for o in bucket.list_objects_v2(Bucket="gunsound-test", Prefix="runs/laptop/")["Contents"]}
    for name in ("config.yaml", "metrics.json", "manifest.parquet", "fold_0/model.pt", "fold_0/metrics.json",
                 "fold_0/best_state.pt"):
        assert f"runs/laptop/{name}" in keys
    assert any(k.startswith("runs/laptop/ray/fold_0/checkpoint_") for k in keys)
    config_text = storage.read_text(f"{run}/config.yaml")
    assert "testing" not in config_text  # the credentials never reach the outputs
    # The options, as the run's files on S3 show them.
    epochs = json.loads(storage.read_text(f"{run}/metrics.json"))["folds"]["0"]["epochs"]
    assert "valid_roc_auc" not in epochs[0] and epochs[1]["valid_roc_auc"] > 0  # evaluation_epochs=2
    assert all("train_roc_auc" in e for e in epochs)  # calculate_train_metric
    assert epochs[0]["train_clips"] == 76  # drop_last_batch=false keeps the last partial batch
    assert ModelArtifact.load(f"{run}/fold_0/model.pt").best_epoch == 2
    # laptop.yaml's one worker holds both CPUs of the session's Ray and computes on both.
    workers = json.loads(storage.read_text(f"{run}/fold_0/metrics.json"))[-1]["workers"]
    assert [(w["rank"], w["threads"]) for w in workers] == [(0, 2)]
    seed = yaml.safe_load(config_text)["environment"]["seed"]
    assert seed >= 0  # -1 drew a seed, and the resolved config records it
    # ... and so does the fingerprint, which a rerun with `seed: -1` resumes with (test_reused_output.py)
    assert json.loads(storage.read_text(f"{run}/fingerprint.json"))["settings"]["environment.seed"] == seed
    # A scoring driver reads the model on S3 as it reads a local one (range reads of the pickle, no torch).
    files = model_files(run)
    assert files == [f"{run}/fold_0/model.pt"]
    assert describe_model(files) == load_model_files(files).describe()
    # The run on S3 exports a scoring pipeline to S3 (staged in a temporary folder that is removed).
    assert main(["export", run, "s3://gunsound-test/pipeline",
                 "--set", f"storage.endpoint_url={s3_server}"]) == 0
    keys = {o["Key"] for o in bucket.list_objects_v2(Bucket="gunsound-test", Prefix="pipeline/")["Contents"]}
    assert keys == {f"pipeline/{name}" for name in ("model.pt2", "pipeline.json", "score.py", "windows.py",
                                                     "onsets.py", "events.py", "decode.py")}
