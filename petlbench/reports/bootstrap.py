"""Bootstrap 95% confidence intervals of test AUC and a paired bootstrap test against FPT+ ("Table CI").

Rules (stated in the table's caption and notes):

* Point AUC: `petlbench.engine.metrics.auc_percent` (scikit-learn `roc_auc_score`; binary from P(class 1),
  multi-class macro one-vs-rest over the classes present) on each run's stored best-epoch test predictions,
  averaged over the seeds.
* Percentile bootstrap over test images: `RESAMPLES` resamples of the images with replacement, drawn from a fixed
  seed, identical for every method of one dataset (the images are aligned by `sample_id`, so the test is paired).
  With several seeds a resample's AUC is the mean of the seeds' AUCs on the same resampled images (seeds are
  averaged, not pooled). A resample missing a class present in the test set has no AUC and is skipped (counted).
* A resample's AUC is the tie-aware Mann–Whitney statistic with each image weighted by how often it was drawn, which
  equals `roc_auc_score` on the resampled images (checked in the tests); computing it for all resamples at once
  keeps a report with hundreds of runs fast.
* Paired test: d = AUC(FPT+) − AUC(method) on the same resample; p = share of resamples with d ≤ 0, ties counted
  half (one-sided: a small p says FPT+ is higher on these images; identical predictions give p = 0.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from petlbench.core.results import FINISHED
from petlbench.engine.metrics import auc_percent
from petlbench.reports.collect import HparamChoice, Runs, hparam_notes, ids
from petlbench.reports.model import MISSING, Cell, Column, Row, Section, Table
from petlbench.reports.tables import FPT_PLUS, Selection, main_sections

RESAMPLES = 1000
SEED = 0
NO_PREDICTIONS = "no per-image predictions in the record (written before predictions were stored)"
NOT_AVAILABLE = (
    "no run at the main setting carries per-image test predictions (records written before they were stored)"
)


@dataclass
class Predictions:
    """One run's stored test predictions: sample ids, integer labels and class probabilities."""

    run_id: str
    sample_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray

    @classmethod
    def parse(cls, run_id: str, raw: Mapping[str, Any] | None) -> Predictions | None:
        """From a record's `predictions.test`; None when absent or malformed."""
        if not raw:
            return None
        try:
            sample_ids = [str(s) for s in raw["sample_ids"]]
            labels = np.asarray(raw["labels"], dtype=int)
            probs = np.asarray(raw["probs"], dtype=float)
        except (KeyError, TypeError, ValueError):
            return None
        if probs.ndim != 2 or len(sample_ids) != len(labels) or len(labels) != len(probs) or not len(labels):
            return None
        return cls(run_id, sample_ids, labels, probs)


def resample_counts(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) counts of how often each image is drawn in each resample (n draws with replacement)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    flat = (draws + np.arange(resamples)[:, None] * n).ravel()
    return np.bincount(flat, minlength=resamples * n).reshape(resamples, n)


def weighted_binary_auc(positive: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (0–1) per row of `weights` (integer image multiplicities); NaN where one side has no weight.

    The tie-aware Mann–Whitney statistic: Σ w_i w_j ([s_i > s_j] + ½[s_i = s_j]) / (W₊ W₋) over positive i and
    negative j, which is `roc_auc_score` of the data with image i repeated w_i times. Per positive image the
    negative weight below / tied with its score comes from one cumulative sum over the sorted negatives, in exact
    integer arithmetic.
    """
    weights = np.atleast_2d(weights).astype(np.int32, copy=False)
    positive = np.asarray(positive, dtype=bool)
    neg_scores, pos_scores = scores[~positive], scores[positive]
    order = np.argsort(neg_scores, kind="mergesort")
    neg_sorted = neg_scores[order]
    w_neg = weights[:, np.flatnonzero(~positive)[order]]
    w_pos = weights[:, positive]
    cum = np.zeros((len(weights), len(neg_sorted) + 1), dtype=np.int32)
    np.cumsum(w_neg, axis=1, out=cum[:, 1:])
    low = np.searchsorted(neg_sorted, pos_scores, side="left")
    high = np.searchsorted(neg_sorted, pos_scores, side="right")
    twice = (w_pos * (cum[:, low] + cum[:, high])).sum(
        axis=1, dtype=np.int64
    )  # 2 × (below + ½ tied), weighted by positives
    total_p, total_n = w_pos.sum(axis=1), cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = twice / (2.0 * total_p * total_n)
    auc[(total_p == 0) | (total_n == 0)] = np.nan
    return auc


def auc_resamples(labels: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC ×100 per resample, as `auc_percent` defines it; NaN where a class present in `labels` was not drawn."""
    weights = np.atleast_2d(weights)
    present = sorted(set(labels.tolist()))
    if len(present) < 2 or probs.shape[1] < 2:
        return np.full(len(weights), np.nan)
    if probs.shape[1] == 2:
        return 100.0 * weighted_binary_auc(labels == 1, probs[:, 1], weights)
    per_class = [weighted_binary_auc(labels == c, probs[:, c], weights) for c in present]
    return 100.0 * np.mean(per_class, axis=0)  # NaN (skipped) as soon as one present class is missing


@dataclass
class Aligned:
    """Runs' predictions on their common images (sorted by sample id), and what alignment left out."""

    sample_ids: list[str]
    labels: np.ndarray
    probs: dict[str, np.ndarray]  # run id -> (n, classes) on `sample_ids`
    dropped_images: int = 0  # images not shared by every run
    mismatched: list[str] = field(default_factory=list)  # runs whose labels disagree on the common images


def align(predictions: Sequence[Predictions]) -> Aligned:
    """The predictions restricted to the sample ids every run has, in one order; runs with other labels dropped."""
    if not predictions:
        return Aligned([], np.zeros(0, dtype=int), {})
    common = set(predictions[0].sample_ids).intersection(*(p.sample_ids for p in predictions[1:]))
    every = set().union(*(p.sample_ids for p in predictions))
    sample_ids = sorted(common)
    aligned: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for pred in predictions:
        where = {s: i for i, s in enumerate(pred.sample_ids)}
        rows = np.array([where[s] for s in sample_ids], dtype=int)
        aligned[pred.run_id] = (pred.labels[rows], pred.probs[rows])
    reference = aligned[predictions[0].run_id][0]
    mismatched = [r for r, (lab, _) in aligned.items() if not np.array_equal(lab, reference)]
    probs = {r: p for r, (_, p) in aligned.items() if r not in mismatched}
    return Aligned(sample_ids, reference, probs, len(every) - len(common), mismatched)


@dataclass
class MethodStats:
    """One method's bootstrap on one dataset: point AUC, its CI, and the paired comparison with FPT+."""

    point: float
    low: float
    high: float
    resampled: np.ndarray  # mean-over-seeds AUC per resample (NaN = skipped)
    seeds: int
    delta: float | None = None  # AUC(FPT+) − AUC(method)
    delta_low: float | None = None
    delta_high: float | None = None
    p: float | None = None


def method_stats(aligned: Aligned, run_ids: Sequence[str], counts: np.ndarray) -> MethodStats | None:
    """Point AUC (mean over seeds) and percentile 95% CI of a method's runs on the aligned images."""
    usable = [r for r in run_ids if r in aligned.probs]
    if not usable:
        return None
    points = [auc_percent(aligned.labels, aligned.probs[r])[0] for r in usable]
    resampled = np.mean([auc_resamples(aligned.labels, aligned.probs[r], counts) for r in usable], axis=0)
    valid = resampled[np.isfinite(resampled)]
    low, high = np.percentile(valid, [2.5, 97.5]) if len(valid) else (np.nan, np.nan)
    return MethodStats(float(np.mean(points)), float(low), float(high), resampled, len(usable))


def paired_test(reference: MethodStats, other: MethodStats) -> tuple[float, float, float, float]:
    """(Δ point, Δ 2.5%, Δ 97.5%, one-sided p) for Δ = reference − other on the same resamples."""
    diff = reference.resampled - other.resampled
    diff = diff[np.isfinite(diff)]
    point = reference.point - other.point
    if not len(diff):
        return point, float("nan"), float("nan"), float("nan")
    low, high = np.percentile(diff, [2.5, 97.5])
    p = (np.count_nonzero(diff < 0) + 0.5 * np.count_nonzero(diff == 0)) / len(diff)
    return point, float(low), float(high), float(p)


def _num_cell(value: float | None, decimals: int = 2, run_ids: tuple[str, ...] = (), n: int = 0) -> Cell:
    """A numeric cell, or "—" when there is no finite value."""
    if value is None or not np.isfinite(value):
        return Cell(MISSING, status="missing", run_ids=run_ids)
    return Cell(f"{value:.{decimals}f}", value=float(value), n=n, status="ok", run_ids=run_ids)


def _p_cell(p: float | None, resamples: int, run_ids: tuple[str, ...]) -> Cell:
    """A p-value cell: 3 decimals, "<" the resolution of the bootstrap when no resample favoured the method."""
    if p is None or not np.isfinite(p):
        return Cell(MISSING, status="missing", run_ids=run_ids)
    text = f"<{1 / resamples:.3f}" if p == 0 else f"{p:.3f}"
    return Cell(text, value=p, status="ok", run_ids=run_ids, source="one-sided: share of resamples with Δ ≤ 0")


COLUMNS = [
    Column("auc", "Test AUC"),
    Column("auc_low", "2.5%", group="AUC 95% CI"),
    Column("auc_high", "97.5%", group="AUC 95% CI"),
    Column("delta", "FPT+ − method"),
    Column("delta_low", "2.5%", group="Δ 95% CI"),
    Column("delta_high", "97.5%", group="Δ 95% CI"),
    Column("p", "p (Δ ≤ 0)", decimals=3),
    Column("seeds", "Seeds", decimals=0),
    Column("images", "Images", decimals=0),
]


def table_ci(
    runs: Runs, sel: Selection, resamples: int = RESAMPLES, seed: int = SEED, reference: str = FPT_PLUS
) -> Table | None:
    """Table CI: per weights, dataset and method (Table I's runs) the bootstrap CI of test AUC and the paired test."""
    if sel.empty or not any(str(r) in runs.predictions for r in sel.runs["run_id"]):
        return None
    log: list[HparamChoice] = []
    sections: list[Section] = []
    notes: list[str] = []
    no_predictions: set[str] = set()
    ref_label = runs.label(reference)
    for weights, section_runs in main_sections(sel, log):
        finished = section_runs[section_runs["status"] == FINISHED]
        for dataset in sorted(finished["dataset"].dropna().unique()):
            rows, where = _dataset_rows(runs, finished[finished["dataset"] == dataset], resamples, seed, reference)
            sections.append(Section(f"Weights: {weights} · {dataset}", rows))
            tag = f"{dataset} ({weights})"
            no_predictions |= where.pop("no_predictions", set())
            notes.extend(f"{tag}: {text}" for text in where.values() if text)
    if not sections:
        return None
    if no_predictions:
        notes.append(
            f"'—' in the AUC and CI columns: {NO_PREDICTIONS}; runs: "
            + ", ".join(sorted(no_predictions)[:8])
            + (f" and {len(no_predictions) - 8} more" if len(no_predictions) > 8 else "")
            + "."
        )
    return Table(
        key="table_ci",
        number="CI",
        title=f"Bootstrap 95% confidence intervals of test AUC and paired tests against {ref_label}",
        caption=(
            "Test AUC ×100 of Table I's runs (same setting, same selected (lr, weight decay) point; "
            f"{sel.describe()}), recomputed from each run's stored best-epoch test predictions (scikit-learn "
            "roc_auc_score: binary from P(class 1), multi-class macro one-vs-rest), mean over seeds. 95% CI: "
            "percentile bootstrap over the test "
            f"images, {resamples} resamples from seed {seed}; with several seeds each resample's AUC is the mean of "
            "the seeds' AUCs on the same resampled images (averaged, not pooled). "
            f"{ref_label} − method: paired bootstrap on the same resamples (images aligned by sample id); p = share of "
            f"resamples where the difference is ≤ 0 (ties count half): one-sided, a small p says {ref_label} has "
            "the higher AUC on these images. Resamples missing a class are skipped (see notes)."
        ),
        columns=COLUMNS,
        sections=sections,
        notes=[*notes, *hparam_notes(log)[:1]],
        meta={"resamples": resamples, "seed": seed, "reference": reference},
    )


def _dataset_rows(
    runs: Runs, finished: pd.DataFrame, resamples: int, seed: int, reference: str
) -> tuple[list[Row], dict[str, Any]]:
    """The rows of one (weights, dataset) section, plus notes on skipped resamples and alignment."""
    parsed = {str(r): Predictions.parse(str(r), runs.predictions.get(str(r))) for r in finished["run_id"]}
    have = [p for p in parsed.values() if p is not None]
    aligned = align(have)
    counts = resample_counts(len(aligned.sample_ids), resamples, seed) if aligned.sample_ids else None
    info: dict[str, Any] = {"no_predictions": {r for r, p in parsed.items() if p is None}}
    stats: dict[str, MethodStats | None] = {}
    methods = runs.sort_methods(finished["method"].unique())
    for method in methods:
        method_runs = [str(r) for r in finished.loc[finished["method"] == method, "run_id"]]
        stats[method] = method_stats(aligned, method_runs, counts) if counts is not None else None
    if counts is not None:
        any_stats = next((s for s in stats.values() if s is not None), None)
        skipped = int(np.count_nonzero(~np.isfinite(any_stats.resampled))) if any_stats is not None else 0
        if skipped:
            info["skipped"] = f"{skipped} of {resamples} resamples lacked a class and were skipped"
    if have and not aligned.sample_ids:
        info["disjoint"] = "the runs' predictions share no image: no interval"
    if aligned.dropped_images:
        info["dropped"] = f"{aligned.dropped_images} image(s) not predicted by every run were left out"
    if aligned.mismatched:
        info["mismatched"] = "runs whose labels disagree with the others were left out: " + ", ".join(
            aligned.mismatched
        )
    ref = stats.get(reference)
    if ref is None:
        info["reference"] = (
            f"no finished {runs.label(reference)} run here: no paired test"
            if reference not in stats
            else f"{runs.label(reference)} has no per-image predictions: no paired test"
        )
    rows = []
    for method in methods:
        frame = finished[finished["method"] == method]
        run_ids, total = ids(frame), len(frame)
        s = stats[method]
        cells: dict[str, Cell] = {}
        if s is None:
            cells.update({k: Cell(MISSING, status="missing", run_ids=run_ids, source=NO_PREDICTIONS) for k in _KEYS})
        else:
            cells["auc"] = _num_cell(s.point, run_ids=run_ids, n=s.seeds)
            cells["auc_low"] = _num_cell(s.low, run_ids=run_ids, n=s.seeds)
            cells["auc_high"] = _num_cell(s.high, run_ids=run_ids, n=s.seeds)
            if method == reference:
                cells.update({k: Cell("ref.", status="na", run_ids=run_ids) for k in _DELTA_KEYS})
            elif ref is not None:
                delta, low, high, p = paired_test(ref, s)
                both = tuple(sorted(set(run_ids) | set(ids(finished[finished["method"] == reference]))))
                cells["delta"] = _num_cell(delta, run_ids=both)
                cells["delta_low"] = _num_cell(low, run_ids=both)
                cells["delta_high"] = _num_cell(high, run_ids=both)
                cells["p"] = _p_cell(p, resamples, both)
        used = s.seeds if s is not None else 0
        cells["seeds"] = Cell(f"{used}" if used == total else f"{used}/{total}", value=float(used), n=total)
        n_images = len(aligned.sample_ids) if s is not None else 0
        cells["images"] = Cell(str(n_images) if s is not None else MISSING, value=float(n_images) or None)
        rows.append(Row(runs.label(method), method, cells, ranked=False))
    return rows, info


_KEYS = ("auc", "auc_low", "auc_high", "delta", "delta_low", "delta_high", "p")
_DELTA_KEYS = ("delta", "delta_low", "delta_high", "p")
