"""Mixed precision against float32 on a CUDA GPU, in one run on the same model and data: training steps of the
seed's ResNet50 on log-mel batches (what the Train workers run), and scoring of 2 s waveform windows through
the front end and model (what the scoring actors run). Target: mixed precision faster than float32 in both.
    python benchmarks/gpu_precision.py [--backbone resnet50] [--batch-size 64] [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch

from gunsound import train_loop
from gunsound.config import ArchitectureConfig, AudioConfig
from gunsound.features import FeatureParams, mel_frames
from gunsound.inference import ScoringModel
from gunsound.model import ModelArtifact, build_model

CLASSES = 9


def timed(step, steps: int) -> float:
    for _ in range(5):  # warm-up: cuDNN autotuning, allocator
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def training_step_seconds(arch: ArchitectureConfig, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None,
                          steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(arch, CLASSES, pretrained=False).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = train_loop.loss_fn(model(x).float(), y, "BCE")
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps)


def scoring_seconds(model: ScoringModel, waves: torch.Tensor, amp: bool, steps: int) -> float:
    ensemble = model.build().cuda()

    def step():
        with torch.inference_mode(), torch.autocast("cuda", enabled=amp):
            ensemble(waves).float()

    return timed(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: this benchmark measures the GPU paths")
    torch.backends.cudnn.benchmark = True
    params = FeatureParams.from_config(AudioConfig())  # the seed's front end: 48 kHz, 128 mels, hop 512
    arch = ArchitectureConfig(backbone=args.backbone, pretrained=False)
    b = args.batch_size
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.backbone}, batch {b}, "
          f"2 s clips ({params.n_mels} mels x {mel_frames(2.0, params)} frames)")

    x = torch.randn(b, 1, params.n_mels, mel_frames(2.0, params), device="cuda")
    y = torch.nn.functional.one_hot(torch.randint(0, CLASSES, (b,), device="cuda"), CLASSES).float()
    _, bf16 = train_loop.training_precision(torch.device("cuda"), True)  # the dtype the Train workers use
    fp32 = training_step_seconds(arch, x, y, None, args.steps)
    mixed = training_step_seconds(arch, x, y, bf16, args.steps)
    print(f"training   float32 {b / fp32:8.0f} clips/s   {str(bf16)[6:]} autocast {b / mixed:8.0f} clips/s   "
          f"speed-up {fp32 / mixed:.2f}x")

    weights = build_model(arch, CLASSES, pretrained=False).state_dict()
    model = ScoringModel([ModelArtifact(classes=[f"c{i}" for i in range(CLASSES)], features=params,
                                        chunk_seconds=2.0, architecture=arch, loss_function="BCE",
                                        state_dict=weights)])
    waves = 0.1 * torch.randn(4 * b, 2 * params.sample_rate, device="cuda")
    fp32 = scoring_seconds(model, waves, False, args.steps)
    mixed = scoring_seconds(model, waves, True, args.steps)
    print(f"scoring    float32 {len(waves) / fp32:8.0f} windows/s  float16 autocast {len(waves) / mixed:8.0f} "
          f"windows/s  speed-up {fp32 / mixed:.2f}x  ({len(waves) * 2 / mixed:.0f} audio-s/s in the model stage)")
    print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
