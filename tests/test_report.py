"""The report from a run folder written here (no Ray): labels drawn as text, optional parts that fail left out,
captions that say "no gunshot", and the predict timeline."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from gunsound.config import load_config
from gunsound.features import FeatureParams
from gunsound.metrics import cross_validated_metrics
from gunsound.model import ModelArtifact, build_model
from gunsound.report import classes_to_draw, plot_timeline, prediction_caption, write_report
from tests.conftest import FAST, LAPTOP_CONFIG

CLASSES = ["cal $\\x$", "b"]  # a label that matplotlib would parse as (broken) mathtext


def _run(out, clip_paths: list, background: bool = True) -> None:
    cfg = load_config(LAPTOP_CONFIG, [*FAST, "training.run_interpretations=true", "logging.number_of_audios=2"])
    (out / "fold_0").mkdir(parents=True)
    (out / "config.yaml").write_text(cfg.to_yaml())
    ModelArtifact(classes=CLASSES, features=FeatureParams.from_config(cfg.audio, sample_rate=16000),
                  chunk_seconds=1.0, architecture=cfg.architecture, loss_function="BCE",
                  state_dict=build_model(cfg.architecture, 2, pretrained=False).state_dict(),
                  ).save(str(out / "fold_0" / "model.pt"))
    (out / "fold_0" / "metrics.json").write_text(json.dumps([
        {"epoch": e, "lr": 1e-3, "train_batch_loss": [0.7, 0.6], "valid_loss": 0.6, "valid_roc_auc": 0.7}
        for e in (1, 2)]))
    labels = [CLASSES[0], "b", "background" if background else "b", CLASSES[0]]
    manifest = pd.DataFrame({"row": range(4), "path": [str(p) for p in clip_paths],
                             "rel_path": [p.name for p in clip_paths], "label": labels, "fold": [0, 1, 0, 0]})
    manifest.to_parquet(out / "manifest.parquet")
    probs = np.array([[0.9, 0.1], [0.2, 0.7], [0.02, 0.01], [0.6, 0.3]])
    oof = pd.DataFrame({"row": range(4), "fold": [0, 1, 0, 0], "label": labels,
                        **{f"prob_{c}": probs[:, i] for i, c in enumerate(CLASSES)},
                        **{f"true_{c}": [float(lab == c) for lab in labels] for c in CLASSES}})
    oof.to_parquet(out / "oof_predictions.parquet")
    (out / "metrics.json").write_text(json.dumps({
        "classes": CLASSES, "folds": {"0": {}, "1": {}}, "audio": {"reason": "test"},
        "cv": cross_validated_metrics(oof, CLASSES, threshold=0.5)}))


def _clips(folder, n: int) -> list:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sf.write(folder / f"clip{i}.wav", rng.normal(0, 0.1, 16000).astype(np.float32), 16000)
        paths.append(folder / f"clip{i}.wav")
    return paths


def test_report_draws_labels_as_text_and_says_no_gunshot(tmp_path):
    out = tmp_path / "run"
    _run(out, _clips(tmp_path / "clips", 4))
    write_report(str(out))
    page = (out / "report.html").read_text()
    for chart in ("learning_rate.png", "confusion_matrix.png", "per_class.png", "train_spectrograms.png",
                  "valid_predictions.png", "grad_cam.png"):
        assert f'src="{chart}"' in page and (out / chart).stat().st_size > 1000


def test_an_optional_part_that_fails_is_left_out_and_the_report_is_written(tmp_path):
    clips = _clips(tmp_path / "clips", 4)
    clips[0].write_bytes(b"RIFF" + b"\x01" * 64)  # an example clip that cannot be read any more
    clips[3].write_bytes(b"RIFF" + b"\x01" * 64)
    out = tmp_path / "run"
    _run(out, clips)
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("gunsound.report").addHandler(handler)
    try:
        write_report(str(out))
    finally:
        logging.getLogger("gunsound.report").removeHandler(handler)
    page = (out / "report.html").read_text()
    assert 'src="confusion_matrix.png"' in page and 'src="valid_predictions.png"' not in page
    assert [m for m in messages if m.startswith("report: example spectrograms left out: AudioError")]


@pytest.mark.parametrize(("probs", "background", "caption"), [([0.02, 0.01], True, "no gunshot (max 0.02)"),
                                                              ([0.2, 0.7], True, "pred b (0.70)"),
                                                              ([0.02, 0.01], False, "pred cal $\\x$ (0.02)"),
                                                              ([0.42, 0.3], False, "pred cal $\\x$ (0.42)")])
def test_prediction_caption(probs, background, caption):
    """Without background clips in the dataset the metrics count the top class at any probability, and so
    does the caption."""
    assert prediction_caption(CLASSES, np.array(probs), threshold=0.5, predict_background=background) == caption


@pytest.mark.parametrize(("background", "no_gunshot"), [(True, True), (False, False)])
def test_validation_captions_follow_whether_the_dataset_has_background_clips(tmp_path, monkeypatch, background,
                                                                              no_gunshot):
    from gunsound import report

    titles: list[list[str]] = []
    tiles = report._tiles
    monkeypatch.setattr(report, "_tiles", lambda specs, t, *a, **k: (titles.append(t), tiles(specs, t, *a, **k))[1])
    out = tmp_path / "run"
    _run(out, _clips(tmp_path / "clips", 4), background=background)
    write_report(str(out))
    valid = [t for t in titles if t and t[0].startswith("true ")][0]
    assert any("no gunshot" in t for t in valid) == no_gunshot, valid


def test_grad_cam_follows_the_models_own_path_through_a_normed_head():
    """ConvNeXt's head norm is part of the model's forward: Grad-CAM's logits go through it too."""
    import torch

    from gunsound.config import ArchitectureConfig
    from gunsound.report import grad_cam

    torch.manual_seed(0)
    model = build_model(ArchitectureConfig(backbone="convnext_atto", pretrained=False), 2)
    cams = grad_cam(model, torch.randn(2, 1, 64, 64), torch.tensor([0, 1]))
    assert cams.shape == (2, 64, 64) and np.isfinite(cams).all()
    assert model.backbone.head.norm.weight.grad is not None


@pytest.mark.parametrize(("peaks", "drawn"), [([0.01, 0.02, 0.03, 0.04], [1, 2, 3]),
                                               ([0.3, 0.28, 0.26, 0.0, 0.9], [0, 1, 2, 4]),
                                               ([0.01], [0])])
def test_timeline_draws_the_top_classes_and_those_near_the_threshold(peaks, drawn):
    probs = np.array([peaks, np.zeros(len(peaks))])
    assert classes_to_draw(probs, threshold=0.5) == drawn


def test_timeline_of_a_file_with_no_gunshot_draws_without_warnings(tmp_path, recwarn):
    clip = _clips(tmp_path / "clips", 1)[0]
    windows = pd.DataFrame({"start": [0.0, 0.5], "end": [1.0, 1.0],
                            "probs": [np.array([0.01, 0.02]), np.array([0.03, 0.01])]})
    params = FeatureParams(16000, 512, 160, 32, 50.0, 7000.0, False)
    plot_timeline(str(clip), windows, [], CLASSES, params, 0.5, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert not [w for w in recwarn if "legend" in str(w.message).lower()]


@pytest.mark.parametrize("classes", [["_AK-47 (suppressed)", "M4", "Glock"], ["__init__", "_", "b"]])
def test_timeline_legend_names_every_class_drawn_even_one_starting_with_an_underscore(tmp_path, monkeypatch, classes):
    """matplotlib leaves out of a legend every label that starts with "_"."""
    from gunsound import report

    figures, close = [], report.plt.close
    monkeypatch.setattr(report.plt, "close", figures.append)  # kept open to read its legend
    clip = _clips(tmp_path / "clips", 1)[0]
    windows = pd.DataFrame({"start": [0.0, 0.5], "end": [1.0, 1.0], "probs": [np.array([0.9, 0.6, 0.4])] * 2})
    params = FeatureParams(16000, 512, 160, 32, 50.0, 7000.0, False)
    plot_timeline(str(clip), windows, [], classes, params, 0.5, str(tmp_path / "t.png"))
    try:
        legend = [t.get_text() for t in figures[0].axes[2].get_legend().get_texts()]
    finally:
        close(figures[0])
    assert legend == [*classes, "threshold 0.5"]
