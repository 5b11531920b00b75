"""An OUTPUT reused or shared: fingerprints refuse a rerun made differently, one job at a time holds the
folder's lease, error rows are retried, and `gunsound score`'s exit codes."""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import boto3
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from botocore.exceptions import ClientError

from gunsound import fingerprint, storage, training
from gunsound.cli import EXIT_FAILED, main
from gunsound.config import ArchitectureConfig
from gunsound.features import FeatureParams
from gunsound.lease import LEASE_FILE, LeaseHeld, LeaseLost, LeaseStoreError, OutputLease
from gunsound.model import ModelArtifact, build_model
from tests.conftest import TRAINED_RUN_EXTRA, train_args

# ------------------------------------------------------------------------------------------------ the lease


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _pid_view() -> dict:
    """What a pid means to this process: its boot and its pid namespace."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return {"boot_id": f.read().strip(), "pid_namespace": os.stat("/proc/self/ns/pid").st_ino}


def _planted(host: str, pid: int, heartbeat: float, **seen) -> dict:
    """Another job's holder record; from this boot and pid namespace unless `seen` says otherwise."""
    return {"command": "gunsound score", "host": host, **_pid_view(), "pid": pid, "pid_started": 0.0,
            "started": "earlier", "heartbeat": heartbeat, "token": "planted", **seen}


def test_a_second_job_is_refused_while_the_first_holds_the_lease_and_it_is_released_after(tmp_path):
    out = str(tmp_path / "out")
    with OutputLease(out, "gunsound score"):
        held = json.loads((tmp_path / "out" / LEASE_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(LeaseHeld, match=rf"in use by gunsound score \(pid {os.getpid()} on "):
            OutputLease(out, "gunsound train").acquire()
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    with pytest.raises(RuntimeError, match="the job failed"), OutputLease(out, "gunsound score"):
        raise RuntimeError("the job failed")  # released on an exception too
    assert not (tmp_path / "out" / LEASE_FILE).exists()
    with OutputLease(out, "gunsound train"):  # free again
        pass


def test_a_stale_local_lease_is_recovered_and_a_live_one_is_not(tmp_path):
    lease = tmp_path / LEASE_FILE
    lease.write_text(json.dumps(_planted(socket.gethostname(), _dead_pid(), time.time())))
    with OutputLease(str(tmp_path), "gunsound score"):  # its process is gone
        assert json.loads(lease.read_text())["pid"] == os.getpid()
    lease.write_text(json.dumps(_planted("another-host", 1, time.time())))
    with pytest.raises(LeaseHeld, match="another-host"):  # fresh heartbeat on a host we cannot look at
        OutputLease(str(tmp_path), "gunsound score").acquire()
    os.utime(lease, (time.time() - 400, time.time() - 400))  # no heartbeat for longer than stale_after
    with OutputLease(str(tmp_path), "gunsound score", stale_after=300):
        assert json.loads(lease.read_text())["pid"] == os.getpid()
    assert not lease.exists()


def test_the_heartbeat_refreshes_the_lease_and_a_lease_taken_over_fails_the_job(tmp_path):
    lease = tmp_path / LEASE_FILE
    held = OutputLease(str(tmp_path), "gunsound train", heartbeat_s=0.05)
    held.acquire()
    os.utime(lease, (time.time() - 100, time.time() - 100))
    time.sleep(0.3)
    assert time.time() - lease.stat().st_mtime < 5
    lease.write_text(json.dumps(_planted(socket.gethostname(), os.getpid(), time.time())))  # another job's now
    time.sleep(0.3)
    with pytest.raises(LeaseLost, match="taken over by gunsound score"):
        held.release()
    assert json.loads(lease.read_text())["token"] == "planted"  # not ours to remove


def test_a_pid_of_another_pid_namespace_or_boot_on_this_host_is_judged_by_its_heartbeat(tmp_path):
    """Containers with host networking share the hostname but not the pid namespace: a holder's pid that is not
    alive here may be a live job there. So may a holder whose record does not say (written before it did)."""
    lease = tmp_path / LEASE_FILE
    unrecorded = {k: v for k, v in _planted(socket.gethostname(), _dead_pid(), time.time()).items()
                  if k not in ("boot_id", "pid_namespace")}
    for holder in (_planted(socket.gethostname(), _dead_pid(), time.time(),
                            pid_namespace=_pid_view()["pid_namespace"] + 1),
                   _planted(socket.gethostname(), _dead_pid(), time.time(), boot_id="another-boot"),
                   unrecorded):
        lease.write_text(json.dumps(holder))
        with pytest.raises(LeaseHeld, match=rf"in use by gunsound score \(pid {holder['pid']} on "):
            OutputLease(str(tmp_path), "gunsound train").acquire()
        os.utime(lease, (time.time() - 400, time.time() - 400))  # no heartbeat for longer than stale_after
        with OutputLease(str(tmp_path), "gunsound train", stale_after=300):
            held = json.loads(lease.read_text())
            assert held["pid"] == os.getpid()
            assert {k: held[k] for k in ("boot_id", "pid_namespace")} == _pid_view()


def test_a_dead_holder_on_a_system_without_proc_is_recovered_at_once(tmp_path, monkeypatch):
    """macOS has no boot id or pid namespaces to read: both sides record none, and the host and pid tell."""
    from gunsound import lease as lease_module

    monkeypatch.setattr(lease_module, "_boot_id", lambda: None)
    monkeypatch.setattr(lease_module, "_pid_namespace", lambda: None)
    holder = _planted(socket.gethostname(), _dead_pid(), time.time(), boot_id=None, pid_namespace=None)
    (tmp_path / LEASE_FILE).write_text(json.dumps(holder))
    with OutputLease(str(tmp_path), "gunsound train"):  # its heartbeat is fresh: only the dead pid frees it
        assert json.loads((tmp_path / LEASE_FILE).read_text())["pid"] == os.getpid()


@pytest.fixture
def s3_out(s3_server):
    storage.configure_s3(s3_server)
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="gunsound-leases")
    yield client, "s3://gunsound-leases/run"
    for obj in client.list_objects_v2(Bucket="gunsound-leases").get("Contents", []):
        client.delete_object(Bucket="gunsound-leases", Key=obj["Key"])
    client.delete_bucket(Bucket="gunsound-leases")


def test_the_lease_on_s3_is_a_conditional_put(s3_out):
    client, out = s3_out

    def holder() -> dict:
        return json.loads(client.get_object(Bucket="gunsound-leases", Key="run/lease.json")["Body"].read())

    with OutputLease(out, "gunsound score", heartbeat_s=0.05):
        first = holder()
        assert first["pid"] == os.getpid()
        with pytest.raises(LeaseHeld, match="in use by gunsound score"):
            OutputLease(out, "gunsound train").acquire()
        time.sleep(0.3)
        assert holder()["heartbeat"] > first["heartbeat"]  # refreshed with If-Match on its own ETag
    assert "Contents" not in client.list_objects_v2(Bucket="gunsound-leases", Prefix="run/lease.json")
    with pytest.raises(RuntimeError), OutputLease(out, "gunsound score"):
        raise RuntimeError("the job failed")
    assert "Contents" not in client.list_objects_v2(Bucket="gunsound-leases", Prefix="run/lease.json")

    def plant(holder: dict) -> None:
        client.put_object(Bucket="gunsound-leases", Key="run/lease.json", Body=json.dumps(holder).encode())

    plant(_planted("another-host", 1, time.time()))
    with pytest.raises(LeaseHeld, match="another-host"):
        OutputLease(out, "gunsound score").acquire()
    plant(_planted("another-host", 1, time.time() - 400))  # its holder stopped beating
    with OutputLease(out, "gunsound score", stale_after=300):
        assert holder()["pid"] == os.getpid()
    plant(_planted(socket.gethostname(), _dead_pid(), time.time()))  # its process on this host is gone
    with OutputLease(out, "gunsound score"):
        assert holder()["pid"] == os.getpid()


def test_the_lease_of_an_s3_output_whose_name_holds_a_hash_is_its_own(s3_out):
    """S3 keys are opaque: the lease of `run#2` is `run#2/lease.json`, not `run`'s (a URL parser cut the name
    at the "#" as a fragment)."""
    client, out = s3_out
    with OutputLease(out + "#2", "gunsound score"):
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="gunsound-leases")["Contents"]]
        assert keys == ["run#2/lease.json"]
        with OutputLease(out, "gunsound score"):  # another output: not held
            pass


def _hooked(monkeypatch, event: str, handler) -> None:
    """The lease's boto3 clients from now on call `handler` on botocore's `event` (a fault of the store)."""
    made = storage.s3_client

    def client(*args, **kwargs):
        c = made(*args, **kwargs)
        c.meta.events.register(event, handler)
        return c

    monkeypatch.setattr(storage, "s3_client", client)


def _lease_keys(client) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket="gunsound-leases", Prefix="run/lease.json")
            .get("Contents", [])]


def test_a_conditional_put_of_the_lease_resent_after_its_response_was_lost_is_ours(s3_out, monkeypatch):
    """botocore resends a PUT whose response was lost (a read timeout); S3 had applied it, so the resend fails
    its own condition: the lease read back carries our token, and the job goes on."""
    client, out = s3_out
    lose = {"next": False}

    def resend_once(response=None, operation=None, **_):
        if lose["next"] and operation.name == "PutObject" and response is not None \
                and response[0].status_code == 200:
            lose["next"] = False
            return 0  # resend at once
        return None

    _hooked(monkeypatch, "needs-retry.s3.PutObject", resend_once)
    lose["next"] = True  # the creating PUT (If-None-Match: *)
    with OutputLease(out, "gunsound score", heartbeat_s=0.05) as held:
        assert not lose["next"]
        lose["next"] = True  # a heartbeat's PUT (If-Match)
        deadline = time.time() + 10
        while lose["next"] and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert not lose["next"] and not held.lost
    assert _lease_keys(client) == []

    planted = _planted("another-host", 1, time.time() - 400)  # stale: taken over, by a PUT resent too
    client.put_object(Bucket="gunsound-leases", Key="run/lease.json", Body=json.dumps(planted).encode())
    lose["next"] = True
    with OutputLease(out, "gunsound score", stale_after=300):
        assert not lose["next"]
    assert _lease_keys(client) == []


@pytest.mark.parametrize("ignored", ["If-None-Match", "If-Match"])
def test_a_store_that_ignores_conditional_puts_is_refused(s3_out, s3_server, monkeypatch, ignored):
    client, out = s3_out

    def drop_condition(request, **_):
        if ignored in request.headers:
            del request.headers[ignored]

    _hooked(monkeypatch, "before-send.s3.PutObject", drop_condition)
    with pytest.raises(LeaseStoreError, match=rf"{out}/lease.json: the S3 store at {s3_server} ignores "
                                              rf"{ignored} on PutObject, so it cannot keep two jobs from writing "
                                              rf"{out} at once"):
        OutputLease(out, "gunsound score").acquire()
    assert _lease_keys(client) == []


def test_a_heartbeat_that_reads_back_another_jobs_lease_fails_the_job(s3_out, monkeypatch):
    """Another job's write landing just after the heartbeat's, on a store that then lets the next heartbeat's
    If-Match through: only reading the lease back after each heartbeat shows it is no longer ours."""
    client, out = s3_out
    fault = {"on": False}

    def drop_if_match(request, **_):
        if fault["on"] and "If-Match" in request.headers:
            del request.headers["If-Match"]

    def another_job_writes(**_):
        if fault["on"] and fault.setdefault("planted", False) is False:
            fault["planted"] = True
            client.put_object(Bucket="gunsound-leases", Key="run/lease.json",
                              Body=json.dumps(_planted("another-host", 1, time.time())).encode())

    _hooked(monkeypatch, "before-send.s3.PutObject", drop_if_match)
    _hooked(monkeypatch, "after-call.s3.PutObject", another_job_writes)
    held = OutputLease(out, "gunsound train", heartbeat_s=0.05)
    held.acquire()
    fault["on"] = True
    time.sleep(0.5)
    with pytest.raises(LeaseLost, match="taken over by gunsound score"):
        held.release()
    body = json.loads(client.get_object(Bucket="gunsound-leases", Key="run/lease.json")["Body"].read())
    assert body["token"] == "planted"


def test_the_lease_on_s3_is_deleted_on_condition_that_it_is_still_ours(s3_out, monkeypatch):
    client, out = s3_out
    sent = []
    _hooked(monkeypatch, "before-send.s3.DeleteObject", lambda request, **_: sent.append(request.headers.get("If-Match")))
    with OutputLease(out, "gunsound score") as held:
        pass
    assert [v.decode() if isinstance(v, bytes) else v for v in sent] == [held.version]
    assert _lease_keys(client) == []

    def taken_over_meanwhile(request, **_):  # between reading the lease and deleting it
        client.put_object(Bucket="gunsound-leases", Key="run/lease.json",
                          Body=json.dumps(_planted("another-host", 1, time.time())).encode())

    _hooked(monkeypatch, "before-send.s3.DeleteObject", taken_over_meanwhile)
    with OutputLease(out, "gunsound score"):
        pass
    body = json.loads(client.get_object(Bucket="gunsound-leases", Key="run/lease.json")["Body"].read())
    assert body["token"] == "planted"  # not ours to remove


def test_a_store_without_conditional_deletes_still_releases_the_lease(s3_out, monkeypatch):
    client, out = s3_out

    def not_implemented(params, **_):
        if "IfMatch" in params:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "A header you provided implies "
                                         "functionality that is not implemented"}}, "DeleteObject")

    _hooked(monkeypatch, "before-parameter-build.s3.DeleteObject", not_implemented)
    with OutputLease(out, "gunsound score"):
        assert _lease_keys(client) == ["run/lease.json"]
    assert _lease_keys(client) == []


def test_errors_of_the_lease_on_s3_name_it_and_the_s3_error_code_in_one_line_of_the_cli(s3_out, monkeypatch,
                                                                                       capsys):
    client, out = s3_out
    with pytest.raises(LeaseStoreError, match=r"s3://gunsound-no-such-bucket/run/lease.json: could not write "
                                              r"the output's lease on S3: NoSuchBucket"):
        OutputLease("s3://gunsound-no-such-bucket/run", "gunsound score").acquire()

    def no_conditional_puts(params, **_):
        if "IfNoneMatch" in params or "IfMatch" in params:
            raise ClientError({"Error": {"Code": "NotImplemented", "Message": "A header you provided implies "
                                         "functionality that is not implemented"}}, "PutObject")

    _hooked(monkeypatch, "before-parameter-build.s3.PutObject", no_conditional_puts)
    command = argparse.ArgumentParser()
    command.set_defaults(func=lambda _: OutputLease(out, "gunsound score").acquire())
    assert main([], parser=command) == EXIT_FAILED
    assert _one_error_line(capsys) == (f"error: {out}/lease.json: could not write the output's lease on S3: "
                                       "NotImplemented (A header you provided implies functionality that is not "
                                       "implemented)")
    assert _lease_keys(client) == []


def test_an_output_is_claimed_by_its_fingerprint_and_overwrite_removes_only_gunsound_outputs(s3_out):
    client, out = s3_out
    for name in ("files/part-1.parquet", "summary.json", "notes/mine.txt", "filesystem.txt"):
        storage.write_text(f"{out}/{name}", "x")
    made = fingerprint.Fingerprint("score", {"threshold": 0.5}, model={"digest": "a" * 64, "location": "m"})
    with pytest.raises(fingerprint.OutputMismatch, match=r"earlier outputs \(files, summary.json\) but no"):
        fingerprint.claim(out, made, overwrite=False, owned=("files", "summary.json"))
    fingerprint.claim(out, made, overwrite=True, owned=("files", "summary.json"))
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="gunsound-leases", Prefix="run/")["Contents"]}
    assert {k for k in keys if not k.endswith("/")} == {"run/fingerprint.json", "run/notes/mine.txt",
                                                        "run/filesystem.txt"}  # "run/": pyarrow's folder marker
    fingerprint.claim(out, made, overwrite=False, owned=("files", "summary.json"))  # the same: resumes
    other = fingerprint.Fingerprint("score", {"threshold": 0.3}, model={"digest": "b" * 64, "location": "n"})
    with pytest.raises(fingerprint.OutputMismatch, match=r"threshold 0.5 -> 0.3; model \(m, sha256 aaaa"):
        fingerprint.claim(out, other, overwrite=False, owned=("files", "summary.json"))
    training_run = fingerprint.Fingerprint("train", {"training.epochs": 1})
    with pytest.raises(fingerprint.OutputMismatch, match="holds scoring outputs, not a training run"):
        fingerprint.claim(out, training_run, overwrite=True, owned=("fold_*",))


# ------------------------------------------------------------------------------------------------ scoring


def _one_error_line(capsys) -> str:
    """The command's message: one line, no traceback (log lines may share stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _model(folder, seed: int) -> str:
    """A real (untrained) model file: scoring reads it like any trained one, which is all these tests need."""
    import torch

    torch.manual_seed(seed)
    arch = ArchitectureConfig(backbone="resnet10t", pretrained=False)
    features = FeatureParams(sample_rate=16000, n_fft=512, hop_length=256, n_mels=32, f_min=50.0, f_max=8000.0,
                             normalize=True)
    ModelArtifact(classes=["pistol", "rifle"], features=features, chunk_seconds=1.0, architecture=arch,
                  loss_function="BCE", state_dict=build_model(arch, 2, pretrained=False).state_dict()
                  ).save(str(folder / "model.pt"))
    return str(folder / "model.pt")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "a").mkdir()
    (root / "b").mkdir()
    return _model(root / "a", 0), _model(root / "b", 1)


SLIDING = ["--set", "prediction.inference_chunk_method=Sliding", "--set", "scoring.window_seconds=1",
           "--set", "scoring.hop_seconds=1", "--set", "scoring.shard_files=1", "--set", "scoring.actors=1"]


def test_a_busy_output_is_refused_with_its_own_exit_code_before_anything_runs(models, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.float32), 16000)
    out = str(tmp_path / "out")
    with OutputLease(out, "gunsound score"):
        assert main(["score", models[0], str(tmp_path / "a.wav"), out, *SLIDING]) == 5
    assert "in use by gunsound score" in _one_error_line(capsys)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_a_failed_job_exits_1(models, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "not-a-folder").write_text("a file where OUTPUT's parent should be")
    assert main(["score", models[0], str(tmp_path / "a.wav"), str(tmp_path / "not-a-folder" / "out")]) == 1
    _one_error_line(capsys)


@pytest.mark.ray
def test_rescoring_into_one_output_resumes_retries_errors_and_refuses_other_settings(ray_local, models, tmp_path,
                                                                                     monkeypatch, capsys):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    sf.write(inputs / "good.wav", rng.normal(0, 0.1, 48000).astype(np.float32), 16000)
    (inputs / "broken.wav").write_bytes(b"RIFF" + b"\x01" * 200)
    out = tmp_path / "out"
    model_a, model_b = models

    def files() -> pd.DataFrame:
        return pd.read_parquet(out / "files").set_index("file")

    # Every file accounted for, one of them an error row: success; --strict says so with exit 3.
    assert main(["score", model_a, str(inputs), str(out), *SLIDING, "--strict"]) == 3
    assert files().loc[str(inputs / "broken.wav"), "status"] == "error"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["location"] == model_a and len(summary["model"]["digest"]) == 64
    assert summary["settings"]["threshold"] == 0.5 and summary["settings"]["window_seconds"] == 1.0

    # The broken file is readable now: the rerun scores it again and the table still holds each file once.
    sf.write(inputs / "broken.wav", rng.normal(0, 0.1, 32000).astype(np.float32), 16000)
    assert main(["score", model_a, str(inputs), str(out), *SLIDING]) == 0
    assert sorted(files().index) == [str(inputs / "broken.wav"), str(inputs / "good.wav")]
    assert (files()["status"] == "ok").all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retried_errors"] == 1 and summary["skipped_as_finished"] == 1 and summary["files"] == 2
    windows = pd.read_parquet(out / "windows")
    assert windows.groupby("file").size().to_dict() == {str(inputs / "broken.wav"): 2, str(inputs / "good.wav"): 3}

    # Another threshold, window or model: refused, naming it, before Ray or the model's stage is reached.
    import gunsound.ray_runtime

    monkeypatch.setattr(gunsound.ray_runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    before = (out / "files").stat().st_mtime_ns, (out / "fingerprint.json").read_text()
    capsys.readouterr()
    for args, named in [(["--set", "prediction.probability_threshold=0.3"], "threshold 0.5 -> 0.3"),
                        (["--set", "scoring.window_seconds=1.5"], "window_seconds 1.0 -> 1.5"),
                        ([], "model (")]:
        model = model_b if not args else model_a
        assert main(["score", model, str(inputs), str(out), *SLIDING, *args]) == 4
        err = _one_error_line(capsys)
        assert named in err and "--overwrite" in err
    assert ((out / "files").stat().st_mtime_ns, (out / "fingerprint.json").read_text()) == before
    monkeypatch.undo()

    # --overwrite starts afresh with the new settings.
    (out / "notes.txt").write_text("not gunsound's: kept")
    assert main(["score", model_b, str(inputs), str(out), *SLIDING, "--overwrite",
                 "--set", "prediction.probability_threshold=0.3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_as_finished"] == 0 and summary["files"] == 2 and summary["settings"]["threshold"] == 0.3
    assert summary["model"]["location"] == model_b and len(files()) == 2
    assert (out / "notes.txt").exists() and not (out / LEASE_FILE).exists()


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.ray
def test_training_into_one_output_resumes_only_the_same_run(trained_run, synth_dir, tmp_path, monkeypatch, capsys):
    # A copy of the session's finished run (made by `main(train_args(synth_dir, ..., *TRAINED_RUN_EXTRA))`):
    # this test changes it. Its command again, with `seed: -1`, must resume it with the seed it stored.
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    # Its MLflow store names the shared run's artifact folder: the copy tracks nothing (logging is not part of what
    # makes a run the same).
    args = train_args(synth_dir, out, *TRAINED_RUN_EXTRA, "--set", "environment.seed=-1",
                      "--set", "logging.logger=null")
    seed = json.loads((out / "fingerprint.json").read_text())["settings"]["environment.seed"]
    folds = pd.read_parquet(out / "manifest.parquet")[["path", "fold"]]
    model = (out / "fold_0" / "model.pt").stat().st_mtime_ns

    # The same command resumes: the stored seed is kept, so the split and the finished folds are the same.
    assert main(args) == 0
    assert (out / "fold_0" / "model.pt").stat().st_mtime_ns == model
    pd.testing.assert_frame_equal(pd.read_parquet(out / "manifest.parquet")[["path", "fold"]], folds)
    assert f"seed: {seed}\n" in (out / "config.yaml").read_text()

    # Other settings or other data: refused before Ray starts or anything is featurized, naming what differs;
    # config.yaml and manifest.parquet still describe the models in the folder.
    import gunsound.ray_runtime

    monkeypatch.setattr(gunsound.ray_runtime, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    monkeypatch.setattr(training, "featurize", lambda *a, **k: pytest.fail("featurized"))
    other_data = tmp_path / "other"
    shutil.copytree(synth_dir, other_data)
    table = pd.read_parquet(other_data / "train.pq")
    table.iloc[:-5].to_parquet(other_data / "train.pq")
    kept = (out / "config.yaml").read_text(), (out / "manifest.parquet").read_bytes()
    capsys.readouterr()
    for change, named in [(["--set", "training.epochs=3"], "training.epochs 2 -> 3"),
                          (["--set", "training.learning_rate=0.01"], "training.learning_rate 0.003 -> 0.01"),
                          (["--data", str(other_data)], "data (95 clips")]:
        assert main([*args, *change]) == 4
        assert named in _one_error_line(capsys)
    assert ((out / "config.yaml").read_text(), (out / "manifest.parquet").read_bytes()) == kept
    monkeypatch.undo()

    # --overwrite starts afresh: the fold trains again, on the new data (one fold of the two is enough).
    assert main([*args, "--data", str(other_data), "--overwrite", "--set", "dataset.folds=[0]",
                 "--set", "training.epochs=1"]) == 0
    assert (out / "fold_0" / "model.pt").stat().st_mtime_ns != model
    assert len(pd.read_parquet(out / "manifest.parquet")) == len(table) - 5
    assert not (out / LEASE_FILE).exists()
