"""Load stored run records into one DataFrame and aggregate them into table cells.

Rules applied here (and stated in the report's captions and notes):

* A run is at "default options" when its stored `config.method_options` equal the method's defaults
  (`get_method(key)().resolved_options()`); options the record lacks are taken as default. If a method's
  module cannot be loaded, its most common stored option set stands in for the defaults (noted).
* Several (lr, weight decay) points for one method/dataset cell (a grid search in the results folder):
  the point with the highest mean validation AUC is kept, as the papers select hyperparameters.
* A cell shows mean ± sample std of the finished runs; "/" if none finished and one ran out of memory;
  "—" otherwise (failed, still running, or never run). Memory: measured CUDA peak when every run has
  it, else the estimate, marked "†".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from petlbench.core.record import flat_efficiency
from petlbench.core.results import FAILED, FINISHED, RUNNING, ResultStore, summary_row
from petlbench.core.results import OOM as STATUS_OOM
from petlbench.engine.metrics import mean_std
from petlbench.reports.model import MISSING, NA, OOM, Cell

DefaultsFn = Callable[[str], Mapping[str, Any] | None]
ESTIMATED_MARK = "†"


def method_defaults(key: str) -> dict[str, Any] | None:
    """A method's default options as stored in results, or None if the method cannot be loaded."""
    try:
        from petlbench.core.method import get_method

        return get_method(key)().resolved_options()
    except Exception:  # noqa: BLE001 - an unknown or broken method module: fall back (noted by the caller)
        return None


def method_order() -> list[str]:
    """Registered method keys in the papers' order ([] if the registry cannot be read)."""
    try:
        from petlbench.core.method import method_keys

        return method_keys()
    except Exception:  # noqa: BLE001
        return []


def canonical(value: Any) -> str:
    """A comparable JSON text of an option value (tuples = lists, 8.0 = 8)."""

    def norm(v: Any) -> Any:
        """Tuples as lists, integral floats as ints, recursively."""
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {str(k): norm(x) for k, x in v.items()}
        return v

    return json.dumps(norm(value), sort_keys=True, default=str)


def deviations(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Options of a run that differ from the defaults (keys unknown to the defaults count as differing)."""
    return {k: v for k, v in options.items() if k not in defaults or canonical(v) != canonical(defaults[k])}


@dataclass
class Runs:
    """All stored runs as a DataFrame, the default options used per method, and notes for the report."""

    df: pd.DataFrame
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    root: Path | None = None

    def label(self, method: str) -> str:
        """Display name of a method (from its records), else its key."""
        names = self.df.loc[self.df["method"] == method, "method_name"].dropna()
        return str(names.iloc[0]) if len(names) else method

    def sort_methods(self, methods: Iterable[str]) -> list[str]:
        """Methods in registry (papers') order, unknown ones alphabetically after."""
        methods = set(methods)
        known = [m for m in self.order if m in methods]
        return known + sorted(methods - set(known))


def _num(value: Any) -> float | None:
    """A finite float, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def record_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """The flat row the report uses for one stored record: the results table's row plus report-only fields."""
    row = summary_row(dict(record))
    for key in _NUMERIC:
        row[key] = _num(row.get(key))
    config = record.get("config") or {}
    eff = flat_efficiency(record.get("efficiency"))
    power = eff.get("power") or {}
    options = config.get("method_options") or {}
    device = (record.get("environment") or {}).get("device")
    device = device if isinstance(device, dict) else {}
    row.update(
        options=dict(options),
        options_json=canonical(options),
        device=row.get("device") or config.get("device"),
        device_type=device.get("type") or str(config.get("device") or "").split(":")[0] or None,
        measured_mem_mb=row["measured_peak_allocated_mb"],
        preload_gflops=row["preload_gflops_per_image"],
        preload=eff.get("preload") if isinstance(eff.get("preload"), dict) else None,
        power_available=power.get("available") if power else None,
    )
    return row


_NUMERIC = (
    "test_auc",
    "val_auc",
    "trainable",
    "total",
    "ratio_pct",
    "peak_mem_mb",
    "est_peak_mem_mb",
    "measured_peak_allocated_mb",
    "fwd_gflops",
    "train_step_gflops",
    "preload_gflops_per_image",
    "train_images_per_s",
    "end_to_end_images_per_s",
    "train_seconds",
    "preload_seconds",
    "peak_power_w",
    "mean_power_w",
    "energy_j",
)


COLUMNS = list(record_row({}).keys()) + ["nondefault", "is_default"]


def load_runs(results_dir: str | Path, defaults: DefaultsFn | None = None) -> Runs:
    """Every stored run of `results_dir` as a `Runs` (DataFrame plus default-option bookkeeping)."""
    records = ResultStore(results_dir).records()
    return runs_from_records(records, defaults, root=Path(results_dir))


def runs_from_records(
    records: Iterable[Mapping[str, Any]], defaults: DefaultsFn | None = None, root: Path | None = None
) -> Runs:
    """`Runs` from in-memory records (what `load_runs` does after reading the store)."""
    defaults = defaults or method_defaults
    rows = [record_row(r) for r in records if (r.get("config") or {}).get("method")]
    df = pd.DataFrame.from_records(rows, columns=COLUMNS[:-2])
    runs = Runs(df=df, order=method_order(), root=root)
    nondefault: list[dict[str, Any]] = []
    for method in df["method"].dropna().unique():
        found = defaults(method)
        if found is None:
            sub = df[df["method"] == method]
            pool = sub[sub["status"] == FINISHED] if (sub["status"] == FINISHED).any() else sub
            common = Counter(pool["options_json"]).most_common(1)[0][0]
            found = json.loads(common)
            runs.notes.append(
                f"method {method!r} could not be loaded: its most common stored option set is taken as its defaults"
            )
        runs.defaults[method] = dict(found)
    for options, method in zip(df["options"], df["method"], strict=True):
        nondefault.append(deviations(options, runs.defaults.get(method, {})))
    df["nondefault"] = nondefault
    df["is_default"] = [not d for d in nondefault]
    return runs


def most_common(values: Iterable[Any]) -> Any:
    """The most frequent non-null value (ties: the larger/later in sort order), or None."""
    counts = Counter(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not counts:
        return None
    top = max(counts.values())
    return sorted((v for v, c in counts.items() if c == top), key=lambda v: str(v))[-1]


def choose_hparams(cell_runs: pd.DataFrame) -> pd.DataFrame:
    """Keep one (lr, weight decay) point: the one with the best mean validation AUC among finished runs."""
    if cell_runs.empty:
        return cell_runs
    keys = cell_runs[["lr", "weight_decay"]].astype(str).agg("|".join, axis=1)
    if keys.nunique() <= 1:
        return cell_runs

    def score(key: str) -> tuple[int, float]:
        """(has finished runs, mean validation AUC) of one hyperparameter point."""
        group = cell_runs[(keys == key) & (cell_runs["status"] == FINISHED)]
        vals = [v for v in group["val_auc"] if v is not None and math.isfinite(v)]
        return (1 if len(group) else 0, sum(vals) / len(vals) if vals else -math.inf)

    best = max(sorted(keys.unique()), key=score)
    return cell_runs[keys == best]


def select_hparams(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """`choose_hparams` applied to every group of `by` (e.g. method × dataset)."""
    if runs.empty:
        return runs
    parts = [choose_hparams(group) for _, group in runs.groupby(by, dropna=False, sort=False)]
    return pd.concat(parts) if parts else runs.iloc[0:0]


def ids(runs: pd.DataFrame) -> tuple[str, ...]:
    """Run ids of a frame, sorted."""
    return tuple(sorted(str(r) for r in runs["run_id"]))


def fmt_number(value: float, decimals: int, adaptive: bool = False) -> str:
    """Thousands separators, fixed decimals; `adaptive` shows values below 1 with 3 significant digits."""
    if adaptive and 0 < abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:,.{decimals}f}"


def fmt_pct(value: float) -> str:
    """A parameter percentage the way the papers print it (100, 33.8, 1.03, 0.0044)."""
    if value >= 99.995:
        return "100"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.01:
        return f"{value:.2f}"
    return f"{value:.2g}"


def no_value_cell(runs: pd.DataFrame) -> Cell:
    """The cell for runs with no usable number: "/" after an OOM, else "—" with the reason as status."""
    statuses = set(runs["status"]) if not runs.empty else set()
    if STATUS_OOM in statuses:
        return Cell(OOM, status="oom", run_ids=ids(runs[runs["status"] == STATUS_OOM]), n=0)
    if FAILED in statuses:
        return Cell(MISSING, status="failed", run_ids=ids(runs[runs["status"] == FAILED]))
    if RUNNING in statuses:
        return Cell(MISSING, status="running", run_ids=ids(runs[runs["status"] == RUNNING]))
    if FINISHED in statuses:
        return Cell(MISSING, status="undefined", run_ids=ids(runs))
    return Cell(MISSING, status="missing")


def mean_cell(
    runs: pd.DataFrame,
    column: str,
    decimals: int = 2,
    with_std: bool = False,
    scale: float = 1.0,
    adaptive: bool = False,
) -> Cell:
    """Mean (± sample std) of `column` over finished runs with a value; otherwise `no_value_cell`."""
    finished = runs[runs["status"] == FINISHED] if not runs.empty else runs
    have = finished[finished[column].notna()] if not finished.empty else finished
    if have.empty:
        return no_value_cell(runs)
    mean, std = mean_std([float(v) * scale for v in have[column]])
    text = fmt_number(mean, decimals, adaptive)
    if with_std:
        text += f" ± {fmt_number(std, decimals)}" if len(have) > 1 else " ± —"
    return Cell(text, value=mean, std=std, n=len(have), status="ok", run_ids=ids(have))


def memory_cell(runs: pd.DataFrame, budget_mb: float | None = None) -> Cell:
    """Peak training memory (MiB): measured if every finished run measured it, else estimated (marked †).

    With `budget_mb`, a value above the budget shows "/" (status over_budget), as an OOM on that GPU would.
    """
    finished = runs[runs["status"] == FINISHED] if not runs.empty else runs
    measured = finished[finished["measured_mem_mb"].notna()] if not finished.empty else finished
    estimated = finished[finished["est_peak_mem_mb"].notna()] if not finished.empty else finished
    if not finished.empty and len(measured) == len(finished):
        cell, source = mean_cell(measured, "measured_mem_mb", 0), "measured"
    elif not estimated.empty and len(estimated) == len(finished):
        cell, source = mean_cell(estimated, "est_peak_mem_mb", 0), "estimated"
        cell.mark = ESTIMATED_MARK
    elif not finished.empty and finished["peak_mem_mb"].notna().any():
        cell, source = mean_cell(finished, "peak_mem_mb", 0), "mixed"
        cell.mark = ESTIMATED_MARK
    else:
        over = _estimate_over_budget(runs, budget_mb)
        return over if over is not None else no_value_cell(runs)
    cell.source = source
    if budget_mb is not None and (value := cell.finite) is not None and value > budget_mb:
        cell.text, cell.status, cell.mark = OOM, "over_budget", ""
    return cell


def _estimate_over_budget(runs: pd.DataFrame, budget_mb: float | None) -> Cell | None:
    """A '/' cell when runs without a usable figure have an estimate above the budget."""
    if budget_mb is None or runs.empty:
        return None
    est = runs[runs["est_peak_mem_mb"].notna()]
    if not est.empty and float(est["est_peak_mem_mb"].max()) > budget_mb:
        return Cell(
            OOM, value=float(est["est_peak_mem_mb"].max()), status="over_budget", run_ids=ids(est), source="estimated"
        )
    return None


def memory_ratio(
    method_cell: Cell, method_runs: pd.DataFrame, full_cell: Cell, full_runs: pd.DataFrame
) -> tuple[float | None, str]:
    """m for PME: the method's memory / full fine-tuning's, both from the same kind of figure.

    Uses the two displayed figures when they share a source (both measured or both estimated); otherwise
    the ratio of the two estimates if both have one; otherwise None.
    """
    method_value, full_value = method_cell.finite, full_cell.finite
    if method_value is None or full_value is None or full_value <= 0:
        return None, ""
    if method_cell.source == full_cell.source and method_cell.source in ("measured", "estimated"):
        return method_value / full_value, method_cell.source

    def est(frame: pd.DataFrame) -> float | None:
        """Mean estimated peak memory of the finished runs, or None."""
        done = frame[(frame["status"] == FINISHED) & frame["est_peak_mem_mb"].notna()]
        return float(done["est_peak_mem_mb"].mean()) if not done.empty else None

    a, b = est(method_runs), est(full_runs)
    if a is not None and b:
        return a / b, "estimated"
    return None, ""


def power_cell(runs: pd.DataFrame, column: str, decimals: int = 2, scale: float = 1.0) -> Cell:
    """A power/energy cell: the mean of measured values, "n/a" when the runs could not measure power."""
    cell = mean_cell(runs, column, decimals, scale=scale)
    if cell.has_value or runs.empty:
        return cell
    finished = runs[runs["status"] == FINISHED]
    if not finished.empty and (finished["power_available"] == False).all():  # noqa: E712 - None means unknown
        return Cell(
            NA,
            status="na",
            run_ids=ids(finished),
            source="; ".join(sorted({str(r) for r in finished["power_reason"] if r})),
        )
    return cell
