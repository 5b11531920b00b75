"""Pretrained backbone weights, settled once by the driver before any Ray work: fetched from the timm model hub
or read from `architecture.pretrained_weights` (local or s3://), then written into the run's storage, where
every Train worker and Tune trial reads the same copy (on a cluster, the run's S3 output).

    OUTPUT/pretrained/<backbone>.pt     the backbone's state dict (one input channel, no classifier)
    OUTPUT/pretrained/<backbone>.json   where it came from and its SHA-256
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging

import torch

from gunsound import storage
from gunsound.config import ArchitectureConfig
from gunsound.model import build_backbone

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 10.0
WAYS_OUT = ("set architecture.pretrained_weights to a local or s3:// weights file (a timm state dict, "
            ".safetensors, or a gunsound model.pt), or architecture.pretrained: false to train from scratch")


class PretrainedWeightsError(RuntimeError):
    """The pretrained weights a config asks for cannot be had."""


class PretrainedWeightsFileError(PretrainedWeightsError, ValueError):
    """`architecture.pretrained_weights` names no file of the backbone's weights: a bad config, so a ValueError
    too (the CLI's exit status for bad config), unlike a hub that cannot be reached."""


def copy_location(output: str, backbone: str) -> str:
    """Where a run keeps its copy of the backbone weights."""
    return storage.join(output, "pretrained", f"{backbone.replace('/', '_')}.pt")


def _hub_source(backbone: str) -> tuple[str | None, str | None]:
    """The Hugging Face repo timm would download the backbone's default weights from (None when its weights
    live at a plain URL), and that URL."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError:
        cfg = None
    if cfg is None:
        return None, None
    return cfg.hf_hub_id, cfg.url


def check_hub_reachable(hub_id: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Raise at once when the hub cannot serve `hub_id` and no copy is cached: timm's own download retries
    a lost connection for about a minute per file before it gives up."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError

    repo, _, revision = hub_id.partition("@")
    names = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in its order
    if any(isinstance(try_to_load_from_cache(repo, name, revision=revision or None), str) for name in names):
        return
    if constants.HF_HUB_OFFLINE:
        raise PretrainedWeightsError(f"HF_HUB_OFFLINE is set and {hub_id} is not in the local hub cache")
    try:
        get_hf_file_metadata(hf_hub_url(repo, names[0], revision=revision or None), timeout=timeout)
    except HfHubHTTPError:
        return  # an HTTP answer, even a refusal: the hub is there, and timm reports what it says
    except Exception as exc:  # connection refused, DNS, timeout: the hub cannot be reached from here
        raise PretrainedWeightsError(f"the model hub ({constants.ENDPOINT}) cannot be reached: "
                                     f"{type(exc).__name__}: {exc}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(exc, PretrainedWeightsError) else f"{type(exc).__name__}: {first}"


def fetch_backbone(arch: ArchitectureConfig) -> tuple[torch.nn.Module, str]:
    """The pretrained backbone and a description of where its weights came from; one clear error when they
    cannot be had."""
    if arch.pretrained_weights:
        try:
            return build_backbone(arch, pretrained=True), arch.pretrained_weights
        except (FileNotFoundError, ValueError) as exc:
            raise PretrainedWeightsFileError(f"{exc}; {WAYS_OUT}") from exc
        except RuntimeError as exc:  # torch's or timm's refusal to load the tensors: the same bad setting
            raise PretrainedWeightsFileError(f"architecture.pretrained_weights {arch.pretrained_weights}: cannot "
                                             f"be loaded into {arch.backbone} ({_first_line(exc)}); {WAYS_OUT}"
                                             ) from exc
    hub_id, url = _hub_source(arch.backbone)
    source = f"the timm model hub ({hub_id or url})"
    try:
        if hub_id:
            check_hub_reachable(hub_id)
        return build_backbone(arch, pretrained=True), source
    except ValueError:
        raise  # an unknown backbone: its own message names architecture.backbone
    except Exception as exc:  # noqa: BLE001 - hub, HTTP and cache errors all mean the same thing to the user
        raise PretrainedWeightsError(
            f"architecture.backbone {arch.backbone}: pretrained weights could not be fetched from {source}: "
            f"{_first_line(exc)}. To train without the hub, {WAYS_OUT}") from exc


def resolve_pretrained(arch: ArchitectureConfig, output: str) -> ArchitectureConfig:
    """Fetch the backbone's pretrained weights once and keep a copy in the run's storage; returns the
    architecture that points every worker and trial at that copy. Call before Ray does any work: a config
    whose weights cannot be had fails here in seconds. A config with `pretrained: false` is returned as is."""
    if not arch.pretrained:
        return arch
    target = copy_location(output, arch.backbone)
    backbone, source = fetch_backbone(arch)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    storage.write_bytes(target, data)
    storage.write_text(target.removesuffix(".pt") + ".json", json.dumps(
        {"backbone": arch.backbone, "source": source, "sha256": digest, "bytes": len(data)}, indent=1))
    log.info("backbone %s: pretrained weights from %s, copied to %s (sha256 %s)", arch.backbone, source, target,
             digest[:12])
    return dataclasses.replace(arch, pretrained_weights=target)
