"""The device a worker computes on: in a Ray worker the GPU Ray granted it, else the CPU; outside Ray the
configured device. A clear error where Ray granted a GPU that CUDA cannot use (a node whose NVIDIA driver is
older than this torch's CUDA build, or missing), instead of holding the GPU while computing on one CPU thread.
Importable without Ray (the exported scorer)."""

from __future__ import annotations

import logging
import os
import sys

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


def in_ray_worker() -> bool:
    """Whether this process is a Ray worker (a task, an actor, a Train worker), not a driver or a plain process.
    Ray is not imported here: a process that has not imported it is no Ray worker."""
    ray = sys.modules.get("ray")
    try:
        return bool(ray and ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE)
    except Exception:  # noqa: BLE001 - a Ray without these: not a worker we can tell apart
        return False


DEVICES = ("auto", "cuda", "cpu")  # environment.device


def compute_device(who: str, wanted: str = "auto") -> torch.device:
    """In a Ray worker, CUDA only where Ray granted it a GPU: Ray leaves CUDA_VISIBLE_DEVICES alone for a worker
    that asked for none, so CUDA is visible to CPU actors on a GPU node, and the job sized its workers from
    environment.device already. A granted GPU without CUDA raises unless ALLOW_CPU_VAR is set: `who` (a Train
    worker's rank, a scorer actor) names where in the message. Outside Ray, `wanted` (environment.device):
    the CPU, CUDA (an error without it), or CUDA where it is available."""
    if wanted not in DEVICES:
        raise ValueError(f"environment.device {wanted!r} is not one of {', '.join(DEVICES)}")
    if not in_ray_worker():
        if wanted == "cpu":
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device("cuda")
        if wanted == "cuda":
            raise RuntimeError(f"{who}: environment.device is cuda but CUDA is not available here (torch "
                               f"{torch.__version__}, built for CUDA {torch.version.cuda}); set "
                               "environment.device: cpu or auto")
        return torch.device("cpu")
    gpus = granted_gpus()
    if not gpus:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    why = (f"{who} holds GPU(s) {', '.join(gpus)} but CUDA is not available on this node (torch "
           f"{torch.__version__}, built for CUDA {torch.version.cuda})")
    if os.environ.get(ALLOW_CPU_VAR) != "1":
        raise RuntimeError(f"{why}: check the node's NVIDIA driver, or set {ALLOW_CPU_VAR}=1 in the workers' "
                           "environment to compute on its CPU")
    log.warning("%s: computing on the CPU (%s=1)", why, ALLOW_CPU_VAR)
    return torch.device("cpu")
