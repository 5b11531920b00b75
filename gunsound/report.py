"""The experiment report: report.html with PNG charts beside it, readable from disk without a server."""

from __future__ import annotations

import functools
import html
import io
import json
import logging
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from gunsound import audio, storage  # noqa: E402
from gunsound.config import config_from_dict, parse_config_yaml  # noqa: E402
from gunsound.features import FeatureParams, LogMelSpectrogram  # noqa: E402
from gunsound.metrics import METRIC_KEYS  # noqa: E402
from gunsound.model import ModelArtifact  # noqa: E402

log = logging.getLogger(__name__)


def _plain_text(draw: Callable) -> Callable:
    """Draw every label as written: a class or file name with `$` is text, not matplotlib's mathtext."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return drawn


def _optional(what: str, draw: Callable[[], list[str]]) -> list[str]:
    """The charts of one optional part of the report, or none: a part that fails (an unreadable clip, a label
    or a value a chart cannot draw) is logged and left out, and never fails a finished run."""
    try:
        return draw()
    except Exception as exc:  # noqa: BLE001 - any failure of an optional chart must leave the rest of the report
        log.warning("report: %s left out: %s: %s", what, type(exc).__name__, exc)
        plt.close("all")
        return []


def prediction_caption(classes: list[str], probs: np.ndarray, threshold: float, *, predict_background: bool) -> str:
    """What a clip was predicted as, as the metrics count it: its top class, or "no gunshot" when every class stays
    under the threshold and the run predicts background (its dataset holds background clips; see
    `training.predicts_background`). Without background clips the top class is the prediction at any probability."""
    top = int(probs.argmax())
    if predict_background and probs[top] < threshold:
        return f"no gunshot (max {probs[top]:.2f})"
    return f"pred {classes[top]} ({probs[top]:.2f})"


def _save(fig, out: str, name: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(storage.join(out, name), buffer.getvalue())
    return name


def _fold_histories(out: str, folds: list[str]) -> dict[str, list[dict]]:
    histories = {}
    for k in folds:
        uri = storage.join(out, f"fold_{k}", "metrics.json")
        if storage.exists(uri):
            histories[k] = json.loads(storage.read_text(uri))
    return histories


def _curves(histories: dict[str, list[dict]], out: str, metric_key: str) -> list[str]:
    charts = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, hist in histories.items():
        ax.plot([h["epoch"] for h in hist], [h["lr"] for h in hist], marker="o", label=f"fold {k}")
    ax.set(xlabel="epoch", ylabel="learning rate (end of epoch)", title="Learning rate")
    ax.legend(fontsize=7)
    charts.append(_save(fig, out, "learning_rate.png"))

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k, hist in histories.items():
        losses = [loss for h in hist for loss in h.get("train_batch_loss", [])]
        ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, label=f"fold {k}")
    ax.set(xlabel="training batch", ylabel="loss", title="Training loss per batch")
    ax.legend(fontsize=7)
    charts.append(_save(fig, out, "train_batch_loss.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for k, hist in histories.items():
        evaluated = [h for h in hist if "valid_loss" in h]
        axes[0].plot([h["epoch"] for h in evaluated], [h["valid_loss"] for h in evaluated], marker="o", label=f"fold {k}")
        axes[1].plot([h["epoch"] for h in evaluated], [h.get(metric_key) for h in evaluated], marker="o",
                     label=f"fold {k}")
    axes[0].set(xlabel="epoch", ylabel="loss", title="Validation loss")
    axes[1].set(xlabel="epoch", ylabel=metric_key, title=f"Validation {metric_key.removeprefix('valid_')}")
    for ax in axes:
        ax.legend(fontsize=7)
    charts.append(_save(fig, out, "validation_curves.png"))
    return charts


def _confusion(cv: dict, out: str) -> str:
    labels, matrix = cv["labels"], np.array(cv["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(0.6 * len(labels) + 2, 0.6 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                color="white" if v > matrix.max() / 2 else "black")
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (out of fold)")
    return _save(fig, out, "confusion_matrix.png")


def _per_class(cv: dict, out: str) -> str:
    labels = cv["labels"]
    precision = [cv["per_class"][lab]["precision"] for lab in labels]
    recall = [cv["per_class"][lab]["recall"] for lab in labels]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(0.7 * len(labels) + 2, 3.2))
    ax.bar(x - 0.2, precision, 0.4, label="precision")
    ax.bar(x + 0.2, recall, 0.4, label="recall")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), title="Per-class precision and recall (out of fold)")
    ax.legend(fontsize=7)
    return _save(fig, out, "per_class.png")


def _log_mels(paths: list[str], params: FeatureParams, chunk_seconds: float) -> torch.Tensor:
    chunk = int(round(chunk_seconds * params.sample_rate))
    waves = np.stack([audio.fit_length(audio.read(p, params.sample_rate)[0], chunk) for p in paths])
    with torch.inference_mode():
        return LogMelSpectrogram(params)(torch.from_numpy(waves))


def _tiles(specs: np.ndarray, titles: list[str], out: str, name: str, overlays: np.ndarray | None = None) -> str:
    n = len(specs)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(specs[i], origin="lower", aspect="auto", cmap="magma")
        if overlays is not None:
            ax.imshow(overlays[i], origin="lower", aspect="auto", cmap="jet", alpha=0.4)
        ax.set_title(titles[i], fontsize=7)
    return _save(fig, out, name)


def grad_cam(model: torch.nn.Module, spec: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Grad-CAM on the backbone's last feature map, for the given class of each clip, upsampled to the
    spectrogram (batch, mels, frames) and scaled to [0, 1]."""
    model.eval()
    spec = spec.clone().requires_grad_(False)
    features = model.backbone.forward_features(spec)
    features.retain_grad()
    logits = model.classify(features)
    logits.gather(1, target[:, None]).sum().backward()
    weights = features.grad.mean(dim=(-2, -1), keepdim=True)
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=spec.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8)
    return cam.detach().numpy()


def _examples(out: str, classes: list[str], folds: list[str], number_of_audios: int,
              run_interpretations: bool, threshold: float, background_label: str) -> list[str]:
    """Spectrogram tiles of training clips, validation predictions, and Grad-CAM saliency."""
    model_uri = storage.join(out, f"fold_{folds[0]}", "model.pt")
    if not storage.exists(model_uri):
        return []
    artifact = ModelArtifact.load(model_uri)
    params = artifact.features
    n = max(1, number_of_audios)
    manifest = storage.read_parquet(storage.join(out, "manifest.parquet"))
    fold = int(folds[0])
    # As training decides it for the metrics: the dataset (its manifest) holds background clips.
    predict_background = bool((manifest["label"] == background_label).any())
    charts = []
    train = manifest[manifest["fold"] != fold].sample(min(n, (manifest["fold"] != fold).sum()), random_state=0)
    specs = _log_mels(list(train["path"]), params, artifact.chunk_seconds)
    charts.append(_tiles(specs[:, 0].numpy(), [f"{lab}\n{p.rsplit('/', 1)[-1]}" for lab, p in
                                               zip(train["label"], train["rel_path"], strict=True)],
                         out, "train_spectrograms.png"))
    oof_uri = storage.join(out, "oof_predictions.parquet")
    if not storage.exists(oof_uri):
        return charts
    oof = storage.read_parquet(oof_uri)
    oof = oof[oof["fold"] == fold].sample(min(n, int((oof["fold"] == fold).sum())), random_state=0)
    paths = list(manifest.set_index("row").loc[oof["row"], "path"])
    probs = oof[[f"prob_{c}" for c in classes]].to_numpy()
    top = probs.argmax(axis=1)
    titles = [f"true {lab}\n{prediction_caption(classes, p, threshold, predict_background=predict_background)}"
              for lab, p in zip(oof["label"], probs, strict=True)]
    specs = _log_mels(paths, params, artifact.chunk_seconds)
    charts.append(_tiles(specs[:, 0].numpy(), titles, out, "valid_predictions.png"))
    if run_interpretations:
        model = artifact.build()
        cams = grad_cam(model, specs, torch.from_numpy(top))
        charts.append(_tiles(specs[:, 0].numpy(), [t.replace("\n", ", ") for t in titles], out, "grad_cam.png", cams))
    return charts


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


@_plain_text
def write_report(out: str, live: bool = False) -> str:
    """Write OUT/report.html and its charts from what a run wrote under OUT; returns the report's URI.

    With `live`, while folds still train: the curves from every fold's per-epoch metrics.json so far."""
    saved = storage.join(out, "config.yaml")
    cfg = config_from_dict(parse_config_yaml(storage.read_text(saved), saved), saved)
    if live:
        folds = sorted(u.rsplit("/", 2)[-2].removeprefix("fold_") for u in storage.list_files(out)
                       if u.endswith("/metrics.json") and u.rsplit("/", 2)[-2].startswith("fold_"))
        metrics = {"classes": [], "folds": dict.fromkeys(folds), "audio": {}}
    else:
        metrics = json.loads(storage.read_text(storage.join(out, "metrics.json")))
    classes = metrics["classes"]
    folds = list(metrics["folds"])
    metric_key = METRIC_KEYS[cfg.prediction.metric]
    histories = _fold_histories(out, folds)
    charts = _optional("training curves", lambda: _curves(histories, out, metric_key))
    sections = []
    cv = metrics.get("cv")
    if cv:
        summary = [(name, f"{s['mean']:.4f}", f"{s['std']:.4f}", f"{s['min']:.4f}", f"{s['max']:.4f}", s["n"])
                   for name, s in cv["mean_over_folds"].items()]
        sections.append("<h2>Cross-validated metrics</h2>" + _table(summary, ("metric", "mean", "std", "min", "max",
                                                                                "folds")))
        pooled = [(k, f"{v:.4f}") for k, v in cv["pooled"].items()]
        sections.append("<h3>Pooled out-of-fold</h3>" + _table(pooled, ("metric", "value")))
        per_class = [(lab, f"{v['precision']:.3f}", f"{v['recall']:.3f}", f"{v['f1']:.3f}", v["support"])
                     for lab, v in cv["per_class"].items()]
        sections.append("<h3>Per class</h3>" + _table(per_class, ("class", "precision", "recall", "F1", "clips")))
        charts += _optional("confusion matrix", lambda: [_confusion(cv, out)])
        charts += _optional("per-class chart", lambda: [_per_class(cv, out)])
    if not live:
        charts += _optional("example spectrograms", lambda: _examples(
            out, classes, folds, cfg.logging.number_of_audios, cfg.training.run_interpretations,
            cfg.prediction.probability_threshold, cfg.dataset.background_label))
    images = "".join(f'<figure><img src="{c}" alt="{c}"><figcaption>{c}</figcaption></figure>' for c in charts)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(cfg.experiment_name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(cfg.experiment_name)}</h1>
<p>{'<b>Training in progress</b> (updated after every epoch); ' if live else ''}folds {', '.join(folds)};
backbone {html.escape(cfg.architecture.backbone)}; audio: {html.escape(metrics['audio'].get('reason', ''))}</p>
{''.join(sections)}
<h2>Charts</h2>{images}
</body></html>"""
    uri = storage.join(out, "report.html")
    storage.write_text(uri, page)
    return uri


def classes_to_draw(probs: np.ndarray, threshold: float, top: int = 3) -> list[int]:
    """The classes a timeline draws: the `top` most likely always (a file with no gunshot still shows what the
    model saw), and any other whose probability comes within half of the threshold."""
    peak = probs.max(axis=0)
    return sorted(set(np.argsort(-peak)[:top].tolist()) | set(np.flatnonzero(peak >= threshold / 2).tolist()))


@_plain_text
def plot_timeline(path: str, windows: pd.DataFrame, events: list[dict], classes: list[str], params: FeatureParams,
                  threshold: float, out_png: str, max_seconds: float = 600.0) -> str:
    """A PNG of one file: waveform with detected shots, log-mel spectrogram, and per-window probabilities."""
    wave, sr = audio.read(path, params.sample_rate, duration=max_seconds)
    t = np.arange(len(wave)) / sr
    with torch.inference_mode():
        spec = LogMelSpectrogram(params)(torch.from_numpy(wave)[None])[0, 0].numpy()
    fig, axes = plt.subplots(3, 1, figsize=(12, 7), sharex=True)
    axes[0].plot(t, wave, lw=0.4, color="k")
    for e in events:
        axes[0].axvline(e["time"], color="r", lw=0.8, alpha=0.7)
    axes[0].set(ylabel="amplitude", title=f"{path.rsplit('/', 1)[-1]}: {len(events)} shots")
    axes[1].imshow(spec, origin="lower", aspect="auto", cmap="magma", extent=(0, len(wave) / sr, 0, spec.shape[0]))
    axes[1].set(ylabel="mel bin")
    if len(windows):
        centres = ((windows["start"] + windows["end"]) / 2).to_numpy()
        probs = np.stack(windows["probs"].to_numpy())
        drawn = classes_to_draw(probs, threshold)
        lines = [axes[2].plot(centres, probs[:, i], marker=".", label=classes[i])[0] for i in drawn]
        lines.append(axes[2].axhline(threshold, color="grey", ls="--", lw=0.8, label=f"threshold {threshold:g}"))
        # Handles and labels given outright: legend() left to itself hides every label that starts with "_".
        axes[2].legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper right")
    axes[2].set(xlabel="time (s)", ylabel="probability", ylim=(0, 1.02))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(out_png, buffer.getvalue())
    return out_png
