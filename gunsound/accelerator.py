"""The device a worker computes on: CUDA where it runs, else the CPU, and a clear error where Ray granted a GPU
that CUDA cannot use (a node whose NVIDIA driver is older than this torch's CUDA build, or missing), instead of
holding the GPU while computing on one CPU thread. Importable without Ray (the exported scorer)."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

# Set (to 1) where a granted GPU is known not to run CUDA and the CPU is wanted instead: Ray's fake GPUs in tests.
ALLOW_CPU_VAR = "GUNSOUND_ALLOW_CPU_ON_GPU"


def granted_gpus() -> list[str]:
    """The GPU ids Ray granted this task, actor or Train worker; [] outside Ray or without a grant."""
    try:
        import ray

        if not ray.is_initialized():
            return []
        return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    except Exception:  # noqa: BLE001 - no Ray, or not inside a worker: no grant
        return []


def compute_device(who: str) -> torch.device:
    """CUDA where it is available; the CPU where no GPU was granted. A granted GPU without CUDA raises unless
    ALLOW_CPU_VAR is set: `who` (a Train worker's rank, a scorer actor) names where in the message."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    gpus = granted_gpus()
    if gpus:
        why = (f"{who} holds GPU(s) {', '.join(gpus)} but CUDA is not available on this node (torch "
               f"{torch.__version__}, built for CUDA {torch.version.cuda})")
        if os.environ.get(ALLOW_CPU_VAR) != "1":
            raise RuntimeError(f"{why}: check the node's NVIDIA driver, or set {ALLOW_CPU_VAR}=1 in the workers' "
                               "environment to compute on its CPU")
        log.warning("%s: computing on the CPU (%s=1)", why, ALLOW_CPU_VAR)
    return torch.device("cpu")
