#!/usr/bin/env bash
# The GPU check, in one go (under 8 minutes on one GPU): the CUDA tests (`pytest -m gpu`), a training throughput
# figure (ResNet50 on the seed's front end, bf16 autocast as the Train workers run it, clips/s), and an
# end-to-end scoring job on a generated archive (audio-s/s for the whole job and for its model stage). Every
# figure goes to one JSON file; the script exits non-zero when a step fails (the JSON still says which).
#
#   benchmarks/gpu_check.sh [--dry-run] [--out FILE] [--wheels DIR] [--archive-hours H] [--workdir DIR]
#
#   --dry-run        the same steps at tiny sizes on whatever device is there (a laptop's CPU): checks the script
#   --out            the JSON (default benchmarks/results/gpu_check.json)
#   --wheels         a folder of wheels to install what the machine lacks (default .whl/, see below)
#   --archive-hours  audio in the scoring archive (default 24; 48 files of 30 minutes, 4 of them distinct)
#
# A GPU machine with torch, torchaudio, timm, pyarrow and scikit-learn but without Ray, soundfile or boto3, and
# no network: carry the missing wheels in a folder beside the checkout, made where the network is, for the GPU
# machine's Python (3.11, x86-64 Linux) and at the versions CI tested (configs/cluster-lock.txt):
#
#   pip download -d .whl --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
#       -c configs/cluster-lock.txt 'ray[default,train,data,tune]' soundfile boto3 pandas matplotlib psutil pytest
#
# The script then installs them with `pip install --no-index --find-links .whl ...` (torch and the rest of the
# image stay as they are) and runs gunsound from the checkout (PYTHONPATH), without installing it.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DRY_RUN=0
OUT="benchmarks/results/gpu_check.json"
WHEELS=".whl"
ARCHIVE_HOURS=24
WORK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        --archive-hours) ARCHIVE_HOURS="$2"; shift ;;
        --workdir) WORK="$2"; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x .venv/bin/python ]; then PY=".venv/bin/python"
else PY="python3"; fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 RAY_DATA_DISABLE_PROGRESS_BARS=1

if [ "$DRY_RUN" = 1 ]; then
    BACKBONE=resnet10t; BATCH=4; STEPS=2; MELS=32; ARCHIVE_HOURS=0.0167; ARCHIVE_FILES=2
else
    BACKBONE=resnet50; BATCH=64; STEPS=30; MELS=128; ARCHIVE_FILES=48
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA GPU here; run with --dry-run to check the script on a CPU" >&2
        exit 2
    fi
fi

if [ -z "$WORK" ]; then
    WORK="$(mktemp -d -t gunsound-gpu-check-XXXXXX)"
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/figures" "$(dirname "$OUT")"
STARTED=$(date +%s)
FAILED=0

# step NAME TIMEOUT_S COMMAND...: runs a step within its time, records its status and seconds.
step() {
    local name="$1" limit="$2"; shift 2
    local t0 rc=0
    t0=$(date +%s)
    echo "== $name (up to ${limit} s)"
    timeout "$limit" "$@" || rc=$?
    printf '{"status": "%s", "exit_code": %d, "seconds": %d}\n' "$([ $rc = 0 ] && echo ok || { [ $rc = 124 ] && echo timed_out || echo failed; })" \
        "$rc" "$(( $(date +%s) - t0 ))" > "$WORK/figures/$name.status.json"
    [ $rc = 0 ] || FAILED=1
}

# 0. What the machine lacks, from the carried wheels.
if ! "$PY" -c "import ray, soundfile, boto3, pandas, matplotlib, psutil, pytest" 2>/dev/null; then
    [ -d "$WHEELS" ] || { echo "gpu_check: Ray, soundfile or boto3 missing and no wheels in $WHEELS (see the top of this script)" >&2; exit 2; }
    step install 240 "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" \
        'ray[default,train,data,tune]==2.60.0' soundfile boto3 pandas matplotlib psutil pytest
fi

# 1. The CUDA tests (on a CPU they all skip, which the JSON shows).
step pytest_gpu 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py --junitxml "$WORK/pytest_gpu.xml"

# 2. Training throughput: the Train workers' step (autocast bf16 where the GPU has it) on random log-mel batches.
step training 90 "$PY" - "$BACKBONE" "$BATCH" "$STEPS" "$MELS" "$WORK/figures/training.json" <<'PY'
import json
import sys
import time

import torch

from gunsound import train_loop
from gunsound.config import ArchitectureConfig, AudioConfig
from gunsound.features import FeatureParams, mel_frames
from gunsound.model import build_model

backbone, batch, steps, mels, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.backends.cudnn.benchmark = True
params = FeatureParams.from_config(AudioConfig(mel_frequency_bins=mels))  # the seed's front end
frames = mel_frames(2.0, params)
amp, dtype = train_loop.training_precision(device, True)
torch.manual_seed(0)
model = build_model(ArchitectureConfig(backbone=backbone, pretrained=False), 9).to(device).train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16)
x = torch.randn(batch, 1, params.n_mels, frames, device=device)
y = torch.nn.functional.one_hot(torch.randint(0, 9, (batch,), device=device), 9).float()


def step():
    with torch.autocast(device.type, dtype=dtype, enabled=amp):
        loss = train_loop.loss_fn(model(x).float(), y, "BCE")
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


for _ in range(min(5, steps)):  # warm-up: cuDNN autotuning, the allocator
    step()
sync()
started = time.perf_counter()
for _ in range(steps):
    step()
sync()
seconds = time.perf_counter() - started
figures = {"backbone": backbone, "batch": batch, "steps": steps, "input": [1, params.n_mels, frames],
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "precision": str(dtype).split(".")[-1] if amp else "float32", "clips_per_second": batch * steps / seconds}
if device.type == "cuda":
    figures["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
json.dump(figures, open(out, "w"), indent=1)
print(f"training: {figures['clips_per_second']:.0f} clips/s ({backbone}, batch {batch}, {figures['precision']}, "
      f"{figures['device']})")
PY

# 3. Scoring end to end: an archive of long recordings and a model file (untrained weights: speed does not
#    depend on them), scored by the Ray job as `gunsound score` runs it.
step scoring_archive 120 "$PY" - "$BACKBONE" "$MELS" "$ARCHIVE_HOURS" "$ARCHIVE_FILES" "$WORK" <<'PY'
import shutil
import sys
from multiprocessing import Pool
from pathlib import Path

from gunsound.config import ArchitectureConfig, AudioConfig
from gunsound.features import FeatureParams
from gunsound.model import ModelArtifact, build_model
from gunsound.synthesis import generate_archive

backbone, mels, hours, files, work = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
arch = ArchitectureConfig(backbone=backbone, pretrained=False)
classes = [f"class_{i}" for i in range(9)]
(work / "model").mkdir(parents=True, exist_ok=True)
ModelArtifact(classes=classes, features=FeatureParams.from_config(AudioConfig(mel_frequency_bins=mels)),
              chunk_seconds=2.0, architecture=arch, loss_function="BCE",
              state_dict=build_model(arch, len(classes)).state_dict()).save(str(work / "model" / "model.pt"))
minutes = hours * 60 / files
distinct = min(4, files)  # a few distinct recordings, copied: generating a day of audio would take the budget
sources = [work / "sources" / f"take_{i}.wav" for i in range(distinct)]
with Pool(distinct) as pool:
    pool.starmap(generate_archive, [(path, minutes, 2.0, 48000, i) for i, path in enumerate(sources)])
(work / "archive").mkdir(exist_ok=True)
for j in range(files):
    shutil.copyfile(sources[j % distinct], work / "archive" / f"recording_{j:03d}.wav")
print(f"archive: {files} files of {minutes:g} min ({hours:g} h), model {backbone} with {mels} mels")
PY
step scoring 240 "$PY" -m ray_jobs.score "$WORK/model/model.pt" "$WORK/archive" "$WORK/scored"

# 4. One JSON of every figure.
"$PY" - "$WORK" "$OUT" "$DRY_RUN" "$(( $(date +%s) - STARTED ))" <<'PY'
import json
import platform
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

work, out, dry_run, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
figures_dir = work / "figures"
report = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "dry_run": dry_run, "host": platform.node(),
          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
          "torch": torch.__version__, "seconds": seconds,
          "steps": {p.name.removesuffix(".status.json"): json.loads(p.read_text())
                    for p in sorted(figures_dir.glob("*.status.json"))}}
junit = work / "pytest_gpu.xml"
if junit.exists():
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    report["pytest_gpu"] = counts
if (figures_dir / "training.json").exists():
    report["training"] = json.loads((figures_dir / "training.json").read_text())
summary_path = work / "scored" / "summary.json"
if summary_path.exists():
    summary = json.loads(summary_path.read_text())
    audio_s = summary["audio_hours"] * 3600
    actors = max(summary.get("scorer_actors") or 1, 1)
    model_s = summary.get("model_seconds") or 0.0
    report["scoring"] = {
        "files": summary["files"], "files_ok": summary["files_ok"], "audio_seconds": audio_s,
        "wall_seconds": summary["wall_seconds"], "devices": summary.get("devices"), "scorer_actors": actors,
        "job_audio_seconds_per_second": summary["audio_seconds_per_second"],
        # the model stage as its actors run side by side: audio over the time each actor spent in the model
        "model_stage_audio_seconds_per_second": audio_s / (model_s / actors) if model_s else None,
    }
out.write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
print(f"figures: {out}")
PY

exit $FAILED
