"""Classification metrics of the papers: AUC (binary, or macro one-vs-rest) from softmax probabilities."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score, roc_auc_score


def auc_percent(labels: np.ndarray, probs: np.ndarray) -> tuple[float, str | None]:
    """ROC-AUC x 100 and a note: binary from P(class 1); multi-class macro OvR over classes present.

    A class with no positive (or no negative) example in `labels` has no defined one-vs-rest AUC: it is
    left out of the macro mean and named in the note. With fewer than two classes present the AUC is
    undefined (NaN) and the note says so.
    """
    labels = np.asarray(labels)
    num_classes = probs.shape[1]
    present = sorted(set(labels.tolist()))
    if len(present) < 2:
        return math.nan, f"AUC undefined: the split contains only class(es) {present}"
    if num_classes == 2:
        return float(roc_auc_score(labels, probs[:, 1]) * 100.0), None
    per_class, missing = [], []
    for cls in range(num_classes):
        positives = labels == cls
        if positives.all() or not positives.any():
            missing.append(cls)
            continue
        per_class.append(roc_auc_score(positives.astype(int), probs[:, cls]))
    note = f"classes {missing} absent from the split: macro AUC over the others" if missing else None
    return float(np.mean(per_class) * 100.0), note


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """AUC (x100), accuracy, macro F1 and quadratic-weighted kappa (x100) of one evaluation."""
    preds = probs.argmax(axis=1)
    auc, note = auc_percent(labels, probs)
    result: dict[str, Any] = {
        "auc": auc,
        "acc": float(accuracy_score(labels, preds) * 100.0),
        "f1_macro": float(f1_score(labels, preds, average="macro", zero_division=0) * 100.0),
        "n": len(labels),
    }
    try:
        result["kappa_quadratic"] = float(cohen_kappa_score(labels, preds, weights="quadratic") * 100.0)
    except ValueError:
        result["kappa_quadratic"] = None
    if note:
        result["auc_note"] = note
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value); NaNs are ignored."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    if len(finite) == 1:
        return finite[0], 0.0
    return statistics.fmean(finite), statistics.stdev(finite)
