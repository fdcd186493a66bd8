"""Load stored run records into one DataFrame and aggregate them into table cells.

Rules applied here (and stated in the report's captions and notes):

* A run is at "default options" when its stored `config.method_options` equal the method's defaults
  (`get_method(key)().resolved_options()`); options the record lacks are taken as default. If a method's
  module cannot be loaded, its most common stored option set stands in for the defaults (noted).
* Several (lr, weight decay) points for one cell (method, option point, dataset + fingerprint, backbone,
  resolution, weights, epochs, batch size): the sweep's own choice is kept when the sweep recorded it
  (`results/_sweeps/<sweep>.selection.json`); otherwise the papers' rule as the sweep applies it: grid points
  are compared by the best-epoch validation AUC of the *search seed* only (the smallest seed run at every
  point), ties to the smaller (lr, weight decay), and every seed at the chosen point is reported. Seed sets
  are never mixed across grid points (`HPARAM_RULE`).
* Datasets are keyed by name + content fingerprint: two contents under one name become two columns, the
  name suffixed with a short fingerprint (noted).
* A cell shows mean ± sample std of the finished runs; "/" if none finished and one ran out of memory;
  "—" otherwise (failed, still running, or never run). Memory: measured CUDA peak when every run has
  it, else the estimate, marked "†".
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
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
SWEEP_STATE_DIR = "_sweeps"  # results/_sweeps/<sweep>.selection.json: the cells' choices (petlbench.sweep.plan)
SELECTION_SUFFIX = ".selection.json"
# The columns that make one hyperparameter-search cell: runs differing in any of them are never compared.
CELL_COLUMNS = (
    "method", "options_key", "dataset", "backbone", "res", "weights", "epochs", "batch_size", "augmentation"
)  # fmt: skip
HPARAM_RULE = (
    "(lr, weight decay) selection: per cell (method, options, dataset, backbone, resolution, weights, epochs, "
    "batch size), the point the sweep chose and recorded (results/_sweeps/<sweep>.selection.json); for cells no "
    "sweep recorded, the sweep's rule: the point whose search-seed run (the smallest seed run at every grid point) "
    "has the highest best-epoch validation AUC, ties to the smaller (lr, weight decay); failed search runs do not "
    "compete. All seeds at the chosen point are reported; runs at other points are not (seed sets are never "
    "mixed across points)."
)


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
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)  # run id -> its test predictions

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
    predictions = (record.get("predictions") or {}).get("test") if isinstance(record.get("predictions"), dict) else None
    row.update(
        # records written before augmentation was drawn per sample say nothing: they trained on the global stream
        augmentation=config.get("augmentation", "global-stream"),
        dataset_name=config.get("dataset"),
        dataset_fingerprint=config.get("dataset_fingerprint") or (record.get("dataset") or {}).get("fingerprint"),
        has_predictions=bool(
            isinstance(predictions, dict) and predictions.get("sample_ids") and predictions.get("probs")
        ),
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
    "official_ratio_pct",
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


ROW_COLUMNS = list(record_row({}).keys())
SWEEP_COLUMNS = ["sweep_point", "sweep_name", "sweep_recorded"]
COLUMNS = ROW_COLUMNS + SWEEP_COLUMNS + ["nondefault", "is_default", "options_key"]


@dataclass(frozen=True)
class SweepChoice:
    """A sweep's recorded choice for the cell a run belongs to: the chosen point's key and when it was recorded."""

    sweep: str
    point: str  # `point_key(lr, weight_decay)`
    recorded: str


def point_key(lr: Any, weight_decay: Any) -> str:
    """A comparable text of one (lr, weight decay) grid point."""
    return f"{canonical(_num(lr))}|{canonical(_num(weight_decay))}"


def read_sweep_choices(results_dir: str | Path) -> dict[str, SweepChoice]:
    """Run id -> the recorded choice of its sweep cell, from every `_sweeps/*.selection.json` (latest wins)."""
    found: dict[str, SweepChoice] = {}
    folder = Path(results_dir) / SWEEP_STATE_DIR
    for path in sorted(folder.glob(f"*{SELECTION_SUFFIX}")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        name = str(data.get("sweep") or path.name[: -len(SELECTION_SUFFIX)])
        for entry in (data.get("cells") or {}).values():
            if not isinstance(entry, dict) or entry.get("state") != "chosen" or "lr" not in entry:
                continue
            choice = SweepChoice(
                name, point_key(entry.get("lr"), entry.get("weight_decay")), str(entry.get("recorded"))
            )
            run_ids = [str(r.get("run_id")) for r in entry.get("search") or [] if isinstance(r, dict)]
            run_ids += [str(r) for r in entry.get("final_run_ids") or []]
            for run_id in run_ids:
                if run_id not in found or found[run_id].recorded <= choice.recorded:
                    found[run_id] = choice
    return found


def load_runs(results_dir: str | Path, defaults: DefaultsFn | None = None, param_convention: str = "petlbench") -> Runs:
    """Every stored run of `results_dir` as a `Runs` (DataFrame plus default-option bookkeeping). With the
    `official` parameter convention, Params (`ratio_pct`) are the FPT authors' count where a record has it."""
    records = ResultStore(results_dir).records()
    runs = runs_from_records(records, defaults, root=Path(results_dir), choices=read_sweep_choices(results_dir))
    if param_convention == "official" and "official_ratio_pct" in runs.df:
        runs.df["ratio_pct"] = runs.df["official_ratio_pct"].where(
            runs.df["official_ratio_pct"].notna(), runs.df["ratio_pct"]
        )
    return runs


def dataset_labels(names: Iterable[Any], fingerprints: Iterable[Any]) -> tuple[list[Any], list[str]]:
    """Column labels keyed by dataset name + fingerprint: the name, suffixed " [fingerprint prefix]" only where one
    name has several fingerprints (runs without one count as their own content); plus a note per such name."""
    pairs = list(zip(names, fingerprints, strict=True))
    by_name: dict[Any, set[str]] = {}
    for name, fp in pairs:
        by_name.setdefault(name, set()).add(str(fp) if fp else "")
    label: dict[tuple[Any, str], Any] = {}
    notes = []
    for name, fps in by_name.items():
        if len(fps) < 2 or name is None:
            label.update({(name, fp): name for fp in fps})
            continue
        known = sorted(f for f in fps if f)
        width = 8
        while width < max(len(f) for f in known) and len({f[:width] for f in known}) < len(known):
            width += 4
        label.update({(name, fp): f"{name} [{fp[:width] if fp else 'no fingerprint'}]" for fp in fps})
        notes.append(
            f"dataset {name!r} has {len(fps)} different contents (fingerprints): kept apart as "
            + ", ".join(sorted(str(label[(name, fp)]) for fp in fps))
            + " (never averaged together)"
        )
    return [label[(n, str(f) if f else "")] for n, f in pairs], notes


def runs_from_records(
    records: Iterable[Mapping[str, Any]],
    defaults: DefaultsFn | None = None,
    root: Path | None = None,
    choices: Mapping[str, SweepChoice] | None = None,
) -> Runs:
    """`Runs` from in-memory records (what `load_runs` does after reading the store)."""
    defaults = defaults or method_defaults
    records = [r for r in records if (r.get("config") or {}).get("method")]
    rows = [record_row(r) for r in records]
    df = pd.DataFrame.from_records(rows, columns=ROW_COLUMNS)
    runs = Runs(df=df, order=method_order(), root=root)
    for record in records:
        test = (record.get("predictions") or {}).get("test")
        if isinstance(test, dict) and test.get("sample_ids") and test.get("probs"):
            runs.predictions[str(record.get("run_id"))] = test
    labels, notes = dataset_labels(df["dataset_name"], df["dataset_fingerprint"])
    df["dataset"] = labels
    runs.notes.extend(notes)
    choices = choices or {}
    chosen = [choices.get(str(r)) for r in df["run_id"]]
    df["sweep_point"] = [c.point if c else None for c in chosen]
    df["sweep_name"] = [c.sweep if c else None for c in chosen]
    df["sweep_recorded"] = [c.recorded if c else None for c in chosen]
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
    df["options_key"] = [canonical(d) for d in nondefault]
    return runs


def most_common(values: Iterable[Any]) -> Any:
    """The most frequent non-null value (ties: the larger/later in sort order), or None."""
    counts = Counter(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    if not counts:
        return None
    top = max(counts.values())
    return sorted((v for v, c in counts.items() if c == top), key=lambda v: str(v))[-1]


@dataclass(frozen=True)
class HparamChoice:
    """How one cell's (lr, weight decay) point was chosen: by a recorded sweep choice or by the search-seed rule."""

    cell: str  # "method · dataset" (plus options when not default)
    rule: str  # "sweep" or "search seed"
    point: str  # `point_key` of the chosen point
    points: int  # grid points run in the cell
    seed: int | None = None  # the search seed (rule "search seed")
    sweep: str = ""  # the sweep whose recorded choice was used (rule "sweep")
    note: str = ""  # why a recorded choice was not usable, or points left out of the comparison


def _point_order(key: str) -> tuple[float, float]:
    """Numeric (lr, weight decay) of a point key for tie-breaking (a missing value sorts last)."""
    lr, wd = (json.loads(part) for part in key.split("|"))
    return (math.inf if lr is None else float(lr), math.inf if wd is None else float(wd))


def _cell_name(cell_runs: pd.DataFrame) -> str:
    """A readable name of a cell for notes."""
    first = cell_runs.iloc[0]
    options = first.get("options_key")
    extra = f" [{options}]" if options and options != "{}" else ""
    return f"{first.get('method')}{extra} · {first.get('dataset')}"


def choose_hparams(cell_runs: pd.DataFrame, log: list[HparamChoice] | None = None) -> pd.DataFrame:
    """Keep the runs of one cell at its selected (lr, weight decay) point, every seed there (see `HPARAM_RULE`).

    A recorded sweep choice wins (the latest, if several sweeps recorded one). Otherwise the search seed is the
    smallest seed run at every point (if none is, the seed run at the most points, and points without it cannot be
    chosen); among points whose search-seed run finished, the highest validation AUC wins (a missing AUC counts
    as −∞), ties to the smaller (lr, weight decay). Without a finished search-seed run, the search-seed runs
    are kept, so the cell shows why (failed, running).
    """
    if cell_runs.empty:
        return cell_runs
    keys = pd.Series([point_key(lr, wd) for lr, wd in zip(cell_runs["lr"], cell_runs["weight_decay"], strict=True)])
    keys.index = cell_runs.index
    points = sorted(keys.unique(), key=_point_order)
    if len(points) <= 1:
        return cell_runs
    name, note = _cell_name(cell_runs), ""
    if "sweep_point" in cell_runs.columns and cell_runs["sweep_point"].notna().any():
        recorded = cell_runs[cell_runs["sweep_point"].notna()].sort_values("sweep_recorded", kind="stable")
        latest = recorded.iloc[-1]
        if latest["sweep_point"] in points:
            if log is not None:
                log.append(HparamChoice(name, "sweep", latest["sweep_point"], len(points), sweep=latest["sweep_name"]))
            return cell_runs[keys == latest["sweep_point"]]
        note = f"sweep {latest['sweep_name']!r} chose a point with no stored run here"
    seeds = {p: {int(s) for s in cell_runs.loc[keys == p, "seed"].dropna()} for p in points}
    common = set.intersection(*seeds.values())
    if common:
        seed, candidates = min(common), points
    else:
        counts = Counter(s for found in seeds.values() for s in found)
        if not counts:
            return cell_runs
        seed = max(counts, key=lambda s: (counts[s], -s))
        candidates = [p for p in points if seed in seeds[p]]
        note = (note + "; " if note else "") + f"{len(points) - len(candidates)} point(s) lack seed {seed}"
    search = cell_runs[(cell_runs["seed"] == seed) & keys.isin(candidates)]
    best: tuple[float, str] | None = None
    for point in candidates:
        done = search[(keys[search.index] == point) & (search["status"] == FINISHED)]
        if done.empty:
            continue
        vals = [v for v in done["val_auc"] if v is not None and math.isfinite(v)]
        score = max(vals) if vals else -math.inf
        if best is None or score > best[0]:
            best = (score, point)
    if best is None:
        return search
    if log is not None:
        log.append(HparamChoice(name, "search seed", best[1], len(points), seed=seed, note=note))
    return cell_runs[keys == best[1]]


def cell_columns(runs: pd.DataFrame, by: Iterable[str] = ()) -> list[str]:
    """`by` plus every cell column the frame has: the grouping under which (lr, weight decay) points compete."""
    by = list(by)
    return by + [c for c in CELL_COLUMNS if c in runs.columns and c not in by]


def select_hparams(runs: pd.DataFrame, by: list[str], log: list[HparamChoice] | None = None) -> pd.DataFrame:
    """`choose_hparams` applied to every cell within each group of `by` (e.g. method × dataset)."""
    if runs.empty:
        return runs
    groups = runs.groupby(cell_columns(runs, by), dropna=False, sort=False)
    parts = [choose_hparams(group, log) for _, group in groups]
    return pd.concat(parts) if parts else runs.iloc[0:0]


def hparam_notes(log: Sequence[HparamChoice]) -> list[str]:
    """The rule note plus how many cells each rule settled (and why a recorded choice was not used)."""
    if not log:
        return []
    unique = {(c.cell, c.rule, c.point): c for c in log}.values()
    by_sweep = Counter(c.sweep for c in unique if c.rule == "sweep")
    by_seed = Counter(c.seed for c in unique if c.rule == "search seed")
    parts = [f"{n} cell(s) by the choice recorded by sweep {s!r}" for s, n in sorted(by_sweep.items())]
    parts += [f"{n} cell(s) by the validation AUC of search seed {s}" for s, n in sorted(by_seed.items())]
    notes = [HPARAM_RULE, "Cells with several (lr, weight decay) points here: " + "; ".join(parts) + "."]
    odd = sorted({f"{c.cell}: {c.note}" for c in unique if c.note})
    if odd:
        notes.append(
            "Selection caveats: " + "; ".join(odd[:8]) + (f"; and {len(odd) - 8} more" if len(odd) > 8 else "") + "."
        )
    return notes


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


def seed_count(n: int) -> str:
    """The run-count mark of a mean ± std cell: "(n=3)"."""
    return f"(n={n})"


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
        text += f" ± {fmt_number(std, decimals)}" if len(have) > 1 else f" ± — {seed_count(1)}"
    # One run has no spread: std stays empty (not 0) in the CSV, whose n_runs says 1.
    spread = std if len(have) > 1 else None
    return Cell(text, value=mean, std=spread, n=len(have), status="ok", run_ids=ids(have))


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
