"""Classification metrics on probabilities (sklearn underneath)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

# The config's prediction.metric -> the validation metric each epoch reports.
METRIC_KEYS = {"ROC_AUC": "valid_roc_auc", "Accuracy": "valid_accuracy", "F1": "valid_f1", "LogLoss": "valid_log_loss"}


def predicted_labels(probs: np.ndarray, classes: list[str], threshold: float, background: str | None) -> list[str]:
    """Top class per row; with background clips in play, a row whose every probability is under the
    threshold is predicted as background ("no gunshot")."""
    top = probs.argmax(axis=1)
    labels = [classes[i] for i in top]
    if background is not None:
        labels = [background if probs[r].max() < threshold else lab for r, lab in enumerate(labels)]
    return labels


def true_labels(targets: np.ndarray, classes: list[str], background: str) -> list[str]:
    return [classes[int(t.argmax())] if t.max() > 0 else background for t in targets]


def has_background(targets: np.ndarray) -> bool:
    """Whether any row is a background clip (all-zero target)."""
    return bool(len(targets)) and bool((targets.max(axis=1) == 0).any())


def classification_metrics(
    probs: np.ndarray, targets: np.ndarray, classes: list[str], threshold: float = 0.5, background: str = "background",
    predict_background: bool | None = None,
) -> dict[str, float]:
    """Macro one-vs-rest ROC AUC (over classes with both positives and negatives), accuracy, macro F1 and
    log loss of the multi-class probabilities.

    `predict_background`: whether a row under the threshold is predicted as background. Decide it once for the
    dataset: left None it follows these targets, so a fold without background clips would score the same
    predictions differently from the pooled set."""
    if predict_background is None:
        predict_background = has_background(targets)
    truth = true_labels(targets, classes, background)
    pred = predicted_labels(probs, classes, threshold, background if predict_background else None)
    scorable = [c for c in range(len(classes)) if 0 < targets[:, c].sum() < len(targets)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = (float(roc_auc_score(targets[:, scorable], probs[:, scorable], average="macro"))
               if scorable else float("nan"))
        labels = sorted(set(truth) | set(pred))
        f1 = float(f1_score(truth, pred, labels=labels, average="macro", zero_division=0))
    fg = targets.max(axis=1) > 0
    normalised = probs[fg] / np.clip(probs[fg].sum(axis=1, keepdims=True), 1e-12, None)
    loss = (float(log_loss(targets[fg].argmax(axis=1), normalised, labels=list(range(len(classes)))))
            if fg.any() else float("nan"))
    return {"roc_auc": auc, "accuracy": float(accuracy_score(truth, pred)), "f1": f1, "log_loss": loss}


def per_class_report(
    probs: np.ndarray, targets: np.ndarray, classes: list[str], threshold: float = 0.5, background: str = "background",
    predict_background: bool | None = None,
) -> dict:
    """Per-class precision, recall, F1 and support, and the confusion matrix (rows true, columns predicted);
    `predict_background` as in `classification_metrics`."""
    if predict_background is None:
        predict_background = has_background(targets)
    truth = true_labels(targets, classes, background)
    pred = predicted_labels(probs, classes, threshold, background if predict_background else None)
    in_play = predict_background or has_background(targets) or background in pred
    labels = list(classes) + ([background] if in_play else [])
    precision, recall, f1, support = precision_recall_fscore_support(truth, pred, labels=labels, zero_division=0)
    return {
        "labels": labels,
        "per_class": {lab: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                      for lab, p, r, f, n in zip(labels, precision, recall, f1, support, strict=True)},
        "confusion_matrix": confusion_matrix(truth, pred, labels=labels).tolist(),
    }


def mean_and_spread(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr)), "min": float(np.nanmin(arr)),
            "max": float(np.nanmax(arr)), "n": int(np.isfinite(arr).sum())}


def cross_validated_metrics(oof: pd.DataFrame, classes: list[str], threshold: float = 0.5,
                            background: str = "background", predict_background: bool | None = None) -> dict:
    """The cross-validated metrics of out-of-fold predictions (columns `fold`, `prob_<class>`, `true_<class>`):
    each fold's metrics, their mean and spread over folds, the pooled metrics, per-class report and confusion
    matrix. Every fold and the pooled set predict background alike: `predict_background`, or else whether the
    out-of-fold set as a whole holds background clips."""
    prob_columns, true_columns = [f"prob_{c}" for c in classes], [f"true_{c}" for c in classes]
    probs, targets = oof[prob_columns].to_numpy(), oof[true_columns].to_numpy()
    if predict_background is None:
        predict_background = has_background(targets)
    per_fold = {str(k): classification_metrics(part[prob_columns].to_numpy(), part[true_columns].to_numpy(),
                                               classes, threshold, background, predict_background)
                for k, part in oof.groupby("fold")}
    summary = {name: mean_and_spread([m[name] for m in per_fold.values()])
               for name in ("roc_auc", "accuracy", "f1", "log_loss")}
    return {"per_fold": per_fold, "mean_over_folds": summary,
            "pooled": classification_metrics(probs, targets, classes, threshold, background, predict_background),
            **per_class_report(probs, targets, classes, threshold, background, predict_background)}
