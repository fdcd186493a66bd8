"""Builders of the papers' tables from stored runs: I (main comparison), II (training efficiency), III
(memory and AUC across resolutions), IV–VI (FPT+ side-input resolution, prompts, reduction factor).

Every builder returns a `Table` (or None when no stored run fits) whose cells carry run counts and ids.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from petlbench.core.record import flat_efficiency
from petlbench.core.results import FINISHED, ResultStore
from petlbench.reports.collect import (
    ESTIMATED_MARK,
    HPARAM_RULE,
    HparamChoice,
    Runs,
    canonical,
    fmt_pct,
    hparam_notes,
    ids,
    mean_cell,
    memory_cell,
    memory_ratio,
    most_common,
    no_value_cell,
    power_cell,
    seed_count,
    select_hparams,
)
from petlbench.reports.efficiency import pme, ppe
from petlbench.reports.model import MISSING, OOM, Cell, Column, Row, Section, Table, highlight

# Rows the papers print as references and leave out of the best/second marking (Tables II and III).
REFERENCE_METHODS = ("full_ft", "linear_probe")
FULL_FT = "full_ft"
FPT_PLUS = "fpt_plus"

MEM_NOTE = (
    "Mem. = peak training memory in MiB (1 MiB = 1,048,576 bytes): the measured CUDA peak "
    "(torch.cuda.max_memory_allocated) when every run measured it, otherwise the estimator's figure, "
    f"marked {ESTIMATED_MARK}."
)
STD_NOTE = (
    "AUC ×100 on the test set at the best-validation epoch; mean ± sample std (n−1) over seeds; '± — (n=1)' = one "
    "seed (no spread)."
)


def mark_seed_counts(table: Table, prefix: str = "auc:") -> str:
    """Append "(n=k)" to mean ± std cells whose seed count differs from the table's usual one; the note to add."""
    cells = [c for _, _, col, c in table.cells() if col.key.startswith(prefix) and c.status == "ok" and c.n > 1]
    if not cells:
        return ""
    counts = Counter(c.n for c in cells)
    usual = max(counts, key=lambda n: (counts[n], n))
    for c in cells:
        if c.n != usual:
            c.text += f" {seed_count(c.n)}"
    odd = "; other counts are marked '(n=k)'" if len(counts) > 1 else ""
    return f"Cells with a spread average n = {usual} seeds{odd}; the CSV's n_runs gives every cell's count."


MISSING_NOTE = "'—' = no finished run (never run, failed or still running); '/' = out of memory."


# chosen jointly; weights are Table I's sections; runs from another augmentation pipeline never mix with these
SETTING_KEYS = ("backbone", "res", "batch_size", "epochs", "augmentation")
FILTER_KEYS = ("backbone", "res", "batch_size", "epochs", "weights", "dataset")
_INT_KEYS = ("res", "batch_size", "epochs")
KEY_LABELS = {
    "backbone": "backbone",
    "res": "resolution",
    "batch_size": "batch size",
    "epochs": "epochs",
    "augmentation": "augmentation pipeline",
    "weights": "weights",
    "dataset": "dataset",
}
SETTING_RULE = (
    "the (backbone, resolution, batch size, epochs, augmentation pipeline) tuple with the most finished "
    "default-option runs (all runs if none finished), tuples with a missing value last; ties: the most method × "
    "dataset cells, then the last in (backbone, resolution, batch size, epochs, augmentation pipeline) order"
)


@dataclass
class Exclusion:
    """Runs left out of the main setting for one reason."""

    reason: str
    run_ids: tuple[str, ...]

    def line(self, shown: int = 3) -> str:
        """`reason: n run(s), e.g. a, b, c` for index.md."""
        more = ", …" if len(self.run_ids) > shown else ""
        return f"{self.reason}: {len(self.run_ids)} run(s), e.g. {', '.join(self.run_ids[:shown])}{more}"


@dataclass
class Selection:
    """The setting a table is drawn from: default-option runs at one backbone, resolution and schedule."""

    backbone: str | None
    res: int | None
    batch_size: int | None
    epochs: int | None
    runs: pd.DataFrame
    filters: dict[str, Any] = field(default_factory=dict)
    augmentation: str | None = None
    chosen_by: str = ""
    excluded: list[Exclusion] = field(default_factory=list)

    def describe(self) -> str:
        """One phrase naming the setting, for captions."""
        if self.backbone is None and self.res is None:
            return "no stored run matches the selection" + (f" ({self.filter_text()})" if self.filters else "")
        text = f"{self.backbone} at {self.res} px, batch {self.batch_size}, {self.epochs} epochs"
        extra = [f"{KEY_LABELS[k]} {v}" for k, v in self.filters.items() if k in ("weights", "dataset")]
        return text + (f" ({', '.join(extra)})" if extra else "")

    def filter_text(self) -> str:
        """The filters as `--filter key=value` flags."""
        return " ".join(f"--filter {k}={v}" for k, v in self.filters.items())

    @property
    def empty(self) -> bool:
        """True when no finished run is at the setting."""
        return self.runs.empty or not (self.runs["status"] == FINISHED).any()


def _filter(df: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """Rows of `df` equal to every given (non-None) column value."""
    for column, value in equal.items():
        if value is not None:
            df = df[df[column] == value]
    return df


def parse_filters(items: Iterable[str] | None) -> dict[str, Any]:
    """`key=value` texts (keys: backbone, res, batch_size, epochs, weights, dataset) as a dict; ValueError if bad."""
    filters: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key, value = key.strip().lower().replace("-", "_"), value.strip()
        if not sep or not key or not value:
            raise ValueError(f"--filter {item!r}: use key=value, e.g. --filter res=512")
        if key not in FILTER_KEYS:
            raise ValueError(f"--filter {item!r}: unknown key {key!r}; use one of {', '.join(FILTER_KEYS)}")
        parsed: Any = value
        if key in _INT_KEYS:
            try:
                parsed = int(value)
            except ValueError:
                raise ValueError(f"--filter {item!r}: {key} must be a whole number") from None
        if key in filters and filters[key] != parsed:
            raise ValueError(f"--filter {key} given twice ({filters[key]} and {parsed})")
        filters[key] = parsed
    return filters


def filter_mask(df: pd.DataFrame, key: str, value: Any) -> pd.Series:
    """Rows matching one filter (a dataset matches its name or its column label)."""
    if key == "dataset":
        return (df["dataset"] == value) | (df["dataset_name"] == value)
    return df[key] == value


def apply_filters(df: pd.DataFrame, filters: Mapping[str, Any]) -> pd.DataFrame:
    """Rows matching every filter."""
    for key, value in filters.items():
        if not df.empty:
            df = df[filter_mask(df, key, value)]
    return df


def check_filters(df: pd.DataFrame, filters: Mapping[str, Any]) -> None:
    """ValueError naming a filter whose value matches no stored run (with the values that exist)."""
    for key, value in filters.items():
        if df.empty or not filter_mask(df, key, value).any():
            column = "dataset" if key == "dataset" else key
            found = sorted({str(v) for v in df[column].dropna()}) if not df.empty else []
            raise ValueError(
                f"--filter {key}={value} matches no stored run"
                + (f"; stored {KEY_LABELS[key]} values: {', '.join(found)}" if found else " (no runs stored)")
            )


def _plain(value: Any) -> Any:
    """None for NaN, an int for an integral float, else the value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def choose_setting(pool: pd.DataFrame, keys: Sequence[str]) -> tuple[dict[str, Any], str]:
    """The most common complete tuple of `keys` among `pool`'s finished runs (see `SETTING_RULE`), and how."""
    if pool.empty:
        return {k: None for k in keys}, "no run"
    basis = pool[pool["status"] == FINISHED] if (pool["status"] == FINISHED).any() else pool
    counts: Counter[tuple[Any, ...]] = Counter()
    cells: dict[tuple[Any, ...], set[tuple[Any, Any]]] = {}
    for _, run in basis.iterrows():
        key = tuple(_plain(run[k]) for k in keys)
        counts[key] += 1
        cells.setdefault(key, set()).add((run["method"], run["dataset"]))

    def rank(key: tuple[Any, ...]) -> tuple[Any, ...]:
        """Complete first, then run count, cell count, then the values in order."""
        return (all(v is not None for v in key), counts[key], len(cells[key]), *(_sort_key(v) for v in key))

    best = max(counts, key=rank)
    ties = [k for k in counts if k != best and rank(k)[:3] == rank(best)[:3]]
    how = f"the most common setting, {counts[best]} {'finished ' if basis is not pool else ''}run(s)"
    if ties:
        how += f"; tied with {len(ties)} other setting(s) on run and cell counts, broken by sort order"
    return dict(zip(keys, best, strict=True)), how


def select_main(
    runs: Runs, backbone: str | None = None, res: int | None = None, filters: Mapping[str, Any] | None = None
) -> Selection:
    """Default-option runs at one jointly chosen (backbone, resolution, batch size, epochs) setting.

    `filters` (and `backbone`/`res`) fix keys; the rest come from the most common complete tuple among the matching
    runs (`SETTING_RULE`). A filter value that matches no stored run raises ValueError.
    """
    fixed = dict(filters or {})
    for key, value in (("backbone", backbone), ("res", res)):
        if value is not None:
            if key in fixed and fixed[key] != value:
                raise ValueError(f"--{key} {value} contradicts --filter {key}={fixed[key]}")
            fixed[key] = value
    df = runs.df
    check_filters(df, fixed)
    pool = df[df["is_default"]] if not df.empty else df
    pool = apply_filters(pool, fixed)
    setting, how = choose_setting(pool, SETTING_KEYS)
    if all(k in fixed for k in SETTING_KEYS):
        how = "set by the filters"
    chosen = _filter(pool, **setting)
    sel = Selection(
        setting["backbone"],
        None if setting["res"] is None else int(setting["res"]),
        setting["batch_size"],
        setting["epochs"],
        chosen,
        filters=fixed,
        chosen_by=how,
        augmentation=setting.get("augmentation"),
    )
    sel.excluded = exclusions(df, sel)
    return sel


def exclusions(df: pd.DataFrame, sel: Selection) -> list[Exclusion]:
    """Why each stored run is not in Table I: filters, non-default options, another setting, another grid point."""
    out: list[Exclusion] = []
    remaining = df

    def take(mask: pd.Series, reason: str) -> None:
        """Move the rows of `remaining` selected by `mask` into one exclusion."""
        nonlocal remaining
        hit = remaining[mask]
        if not hit.empty:
            out.append(Exclusion(reason, ids(hit)))
            remaining = remaining[~mask]

    if df.empty:
        return out
    for key, value in sel.filters.items():
        take(~filter_mask(remaining, key, value), f"outside --filter {key}={value}")
    take(
        ~remaining["is_default"].astype(bool),
        "non-default method options (used only by the option sweeps: Tables IV–VI, Figures 5, 7, 8)",
    )
    for key in SETTING_KEYS:
        value = getattr(sel, key)
        if value is None or remaining.empty:
            continue
        mask = remaining[key] != value
        others = Counter(str(_plain(v)) for v in remaining.loc[mask, key])
        found = ", ".join(f"{v}: {n}" for v, n in sorted(others.items()))
        where = "; Table III compares resolutions" if key == "res" else ""
        take(mask, f"{KEY_LABELS[key]} is not {value} ({found}{where})")
    if not remaining.empty:
        kept = set(select_hparams(remaining, ["method", "dataset"])["run_id"])
        take(
            ~remaining["run_id"].isin(kept),
            "at a (lr, weight decay) point other than the one selected for its cell",
        )
    return out


def main_sections(sel: Selection, log: list[HparamChoice] | None = None) -> list[tuple[str, pd.DataFrame]]:
    """Table I's sections: (weights, runs at each cell's selected point), weights by run count, then name."""
    pool = sel.runs
    counts = Counter(str(w) for w in pool["weights"])
    order = sorted(counts, key=lambda w: (-counts[w], w))
    return [(w, select_hparams(pool[pool["weights"].astype(str) == w], ["method", "dataset"], log)) for w in order]


def _sum_ids(cells: Iterable[Cell]) -> tuple[str, ...]:
    """The union of the cells' run ids, sorted."""
    return tuple(sorted({i for c in cells for i in c.run_ids}))


def average_cell(cells: Sequence[Cell]) -> Cell:
    """Mean of per-dataset means when every dataset has one; "/" if one ran out of memory; else "—"."""
    values = [v for c in cells if (v := c.finite) is not None]
    if cells and len(values) == len(cells):
        value = sum(values) / len(cells)
        return Cell(
            f"{value:.2f}",
            value=value,
            n=sum(c.n for c in cells),
            status="ok",
            run_ids=_sum_ids(cells),
            source=f"mean over {len(cells)} dataset(s)",
        )
    if any(c.status in ("oom", "over_budget") for c in cells):
        return Cell(OOM, status="oom", run_ids=_sum_ids(cells))
    return Cell(MISSING, status="missing", run_ids=_sum_ids(cells), source="not every dataset has a result")


def params_cell(runs: pd.DataFrame) -> Cell:
    """Trainable / total parameters (%) from the runs that counted them (any status)."""
    have = runs[runs["ratio_pct"].notna()] if not runs.empty else runs
    if have.empty:
        return no_value_cell(runs)
    value = float(have["ratio_pct"].mean())
    return Cell(fmt_pct(value), value=value, n=len(have), status="ok", run_ids=ids(have))


def summary_cells(
    runs: pd.DataFrame,
    datasets: Sequence[str],
    full: tuple[Cell, pd.DataFrame] | None,
    budget_mb: float | None = None,
) -> dict[str, Cell]:
    """Per-dataset AUC cells plus avg, params, mem, ppe and pme for one method's (or variant's) runs."""
    cells: dict[str, Cell] = {}
    for dataset in datasets:
        cells[f"auc:{dataset}"] = mean_cell(runs[runs["dataset"] == dataset], "test_auc", 2, with_std=True)
    avg = average_cell([cells[f"auc:{d}"] for d in datasets])
    params = params_cell(runs)
    mem = memory_cell(runs, budget_mb)
    cells.update(avg=avg, params=params, mem=mem)
    avg_value, params_value = avg.finite, params.finite
    if avg_value is not None and params_value is not None:
        value = ppe(avg_value, params_value / 100.0)
        cells["ppe"] = Cell(
            f"{value:.2f}",
            value=value,
            n=avg.n,
            status="ok",
            run_ids=_sum_ids([avg, params]),
            source=f"Avg·exp(−log10(r+1)), r={params_value / 100.0:.6g}",
        )
    else:
        oom = avg.status == "oom"
        cells["ppe"] = Cell(OOM if oom else MISSING, status="oom" if oom else "missing")
    ratio, source = (None, "")
    if full is not None:
        ratio, source = memory_ratio(mem, runs, full[0], full[1])
    if avg_value is not None and ratio is not None:
        value = pme(avg_value, ratio)
        cells["pme"] = Cell(
            f"{value:.2f}",
            value=value,
            n=avg.n,
            status="ok",
            run_ids=_sum_ids([avg, mem, full[0]] if full else [avg, mem]),
            source=f"Avg·exp(−log10(m+1)), m={ratio:.6g} ({source} memory)",
            mark=ESTIMATED_MARK if source == "estimated" else "",
        )
    elif avg.status == "oom" or mem.status in ("oom", "over_budget"):
        cells["pme"] = Cell(OOM, status="oom")
    else:
        cells["pme"] = Cell(
            MISSING, status="missing", source="no full fine-tuning memory to compare with" if avg.has_value else ""
        )
    return cells


def _failure_notes(runs: pd.DataFrame) -> list[str]:
    """Notes naming the failed, out-of-memory and still-running runs of a table."""
    notes = []
    for status, label in (("failed", "failed"), ("oom", "ran out of memory"), ("running", "still running")):
        sub = runs[runs["status"] == status]
        if not sub.empty:
            shown = ", ".join(sorted(sub["run_id"].astype(str))[:12])
            more = f" and {len(sub) - 12} more" if len(sub) > 12 else ""
            notes.append(f"{len(sub)} run(s) {label}: {shown}{more}.")
    return notes


def _full_reference(pool: pd.DataFrame) -> tuple[Cell, pd.DataFrame]:
    """Full fine-tuning's memory cell and runs in `pool` (PME's reference)."""
    full_runs = select_hparams(pool[pool["method"] == FULL_FT], ["dataset"])
    return memory_cell(full_runs), full_runs


def _rank_note(reference: Sequence[str], runs: Runs) -> str:
    """The caption sentence on bold/underline and the unranked reference rows."""
    if not reference:
        return "Best per column in bold, second underlined."
    names = ", ".join(runs.label(m) for m in reference)
    return f"Best per column in bold, second underlined, among the PETL methods ({names}: references, not ranked)."


def table_main(runs: Runs, sel: Selection, reference: Sequence[str] = REFERENCE_METHODS) -> Table | None:
    """Table I: test AUC per dataset, Params, Mem., Avg., PPE and PME, one section per pre-trained weights."""
    pool = sel.runs
    if sel.empty:
        return None
    datasets = sorted(pool["dataset"].dropna().unique())
    columns = [
        Column("params", "Params (%)", "min", 4, group="Computing cost"),
        Column("mem", "Mem. (MiB)", "min", 0, group="Computing cost"),
        *[Column(f"auc:{d}", str(d), "max", 2, group="Test AUC") for d in datasets],
        Column("avg", "Avg.", "max", 2),
        Column("ppe", "PPE", "max", 2),
        Column("pme", "PME", "max", 2),
    ]
    sections = []
    log: list[HparamChoice] = []
    for weights, section_runs in main_sections(sel, log):
        full = _full_reference(section_runs)
        rows = []
        for method in runs.sort_methods(section_runs["method"].unique()):
            method_runs = section_runs[section_runs["method"] == method]
            rows.append(
                Row(
                    runs.label(method),
                    method,
                    summary_cells(method_runs, datasets, full),
                    ranked=method not in reference,
                )
            )
        sections.append(Section(f"Weights: {weights}", rows))
    n_finished = int((pool["status"] == FINISHED).sum())
    hparams = hparam_notes(log) or [HPARAM_RULE + " Here every cell ran a single (lr, weight decay) point."]
    table = Table(
        key="table1_main",
        number="I",
        title="Comparison of methods across datasets (test AUC, parameters, memory, PPE, PME)",
        caption=(
            f"Test AUC of every method at its default options on {len(datasets)} dataset(s); {sel.describe()}; "
            f"grouped by pre-trained weights; {n_finished} finished run(s) at this setting, each cell at its "
            "selected (lr, weight decay) point with all its seeds (rule in the notes). Params = trainable / total "
            "parameters. Avg. = mean of the per-dataset means (only when every dataset has one). "
            "PPE = Avg.·exp(−log10(r+1)), r = Params/100; PME = Avg.·exp(−log10(m+1)), m = Mem. / Mem. of full "
            "fine-tuning in the same section (both measured, or both estimated; PME marked † when estimated). "
            + _rank_note(reference, runs)
        ),
        columns=columns,
        sections=sections,
        notes=[STD_NOTE, MEM_NOTE, MISSING_NOTE, *hparams, *runs.notes, *_failure_notes(pool)],
        meta={"setting": sel.describe(), "datasets": datasets},
    )
    seeds_note = mark_seed_counts(table)
    if seeds_note:
        table.notes.insert(1, seeds_note)
    highlight(table)
    return table


def _device_notes(pool: pd.DataFrame) -> list[str]:
    """Notes naming the devices behind timings (and warning about CPU timings)."""
    finished = pool[pool["status"] == FINISHED]
    devices = sorted(
        {
            f"{n} ({t})" if t and t != n else str(n)
            for n, t in zip(finished["device"], finished["device_type"], strict=True)
            if n
        }
    )
    notes = [f"Measured on: {', '.join(devices)}."] if devices else []
    if (finished["device_type"] == "cpu").any():
        notes.append("CPU timings only smoke-test the code path; they are not comparable to the papers' GPU figures.")
    return notes


def _preload_builders(fpt_runs: pd.DataFrame, all_runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The runs that built the feature caches FPT+ used: FPT+ runs themselves, or (when every FPT+ run reused
    a cache) the runs of any method that built the same cache folder."""
    notes = []
    info = [(r["run_id"], r["preload"] or {}) for _, r in fpt_runs.iterrows() if r["status"] == FINISHED]
    reused = [rid for rid, i in info if i.get("cache_reused")]
    if reused:
        notes.append(f"Preloading: {', '.join(sorted(reused))} reused an existing feature cache (not timed).")
    if any(i and i.get("preloaded") is not False and not i.get("cache_reused") for _, i in info):
        return fpt_runs, notes
    paths = {i.get("cache_path") for rid, i in info if i.get("cache_reused") and i.get("cache_path")}
    built = [
        (r["preload"] or {}).get("cache_path") in paths and not (r["preload"] or {}).get("cache_reused")
        for _, r in all_runs.iterrows()
    ]
    builders = all_runs[built] if paths and not all_runs.empty else all_runs.iloc[0:0]
    if not builders.empty:
        notes.append(
            "Preloading: timed by the run(s) that built the same feature cache: "
            + ", ".join(sorted(builders["run_id"].astype(str)))
            + "."
        )
    return builders, notes


def _preload_frame(builders: pd.DataFrame) -> pd.DataFrame:
    """One row per run that built a feature cache: the preloading step's time, throughput, FLOPs and power."""
    rows = []
    for _, run in builders.iterrows():
        info = run["preload"] or {}
        if run["status"] != FINISHED or (not info and run["preload_seconds"] is None):
            continue
        if info.get("preloaded") is False or info.get("cache_reused") or info.get("cache_hit"):
            continue
        seconds = _first_number(run["preload_seconds"], info.get("preload_seconds"), info.get("seconds"))
        images = _first_number(info.get("images"), info.get("num_images"), info.get("n_images"))
        throughput = _first_number(info.get("images_per_s"), images / seconds if images and seconds else None)
        power = info.get("power")
        if not isinstance(power, dict):
            power = {}
        rows.append(
            {
                "run_id": run["run_id"],
                "status": FINISHED,
                "fwd_gflops": _first_number(info.get("fwd_gflops"), info.get("lpm_fwd_gflops"), run["preload_gflops"]),
                "train_seconds": seconds,
                "train_images_per_s": throughput,
                "peak_power_w": _first_number(power.get("power_peak_w")),
                "mean_power_w": _first_number(power.get("power_avg_w")),
                "energy_j": _first_number(power.get("energy_j")),
                "power_available": power.get("available") if power else None,
                "power_reason": power.get("reason"),
            }
        )
    columns = [
        "run_id",
        "status",
        "fwd_gflops",
        "train_seconds",
        "train_images_per_s",
        "peak_power_w",
        "mean_power_w",
        "energy_j",
        "power_available",
        "power_reason",
    ]
    return pd.DataFrame.from_records(rows, columns=columns)


def _first_number(*values: Any) -> float | None:
    """The first finite number among `values`, or None."""
    for value in values:
        if value is None or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            return number
    return None


def _efficiency_cells(frame: pd.DataFrame) -> dict[str, Cell]:
    """Table II's cells for one method's (or the preloading step's) runs; a throughput from timed steps that varied
    by more than SPREAD_LIMIT_PCT is marked UNRELIABLE_MARK."""
    spread = _spread_cell(frame)
    throughput = mean_cell(frame, "train_images_per_s", 2)
    if spread.mark and throughput.has_value:
        throughput.mark = UNRELIABLE_MARK
    return {
        "flops": mean_cell(frame, "fwd_gflops", 2, adaptive=True),
        "flops_no_attention": (
            mean_cell(frame, "fwd_gflops_no_attention", 2, adaptive=True)
            if "fwd_gflops_no_attention" in frame
            else Cell()
        ),
        "time": mean_cell(frame, "train_seconds", 2),
        "throughput": throughput,
        "spread": spread,
        "peak_w": power_cell(frame, "peak_power_w", 2),
        "mean_w": power_cell(frame, "mean_power_w", 2),
        "energy": power_cell(frame, "energy_j", 2, scale=1e-3),
    }


UNRELIABLE_MARK = "‡"  # † already marks estimated memory elsewhere in the report
SPREAD_LIMIT_PCT = 50.0
SPREAD_NOTE = (
    "Step spread: (slowest − fastest timed training step) / median step, in %, the largest over the seeds; "
    f"{UNRELIABLE_MARK} timed steps varied by more than {SPREAD_LIMIT_PCT:.0f} %: the throughput is unreliable."
)


def _spread_cell(frame: pd.DataFrame) -> Cell:
    """The largest step-time spread (%) of the finished runs, marked UNRELIABLE_MARK above SPREAD_LIMIT_PCT."""
    if "spread_pct" not in frame.columns:
        return Cell(MISSING, status="missing", source="no timed steps")
    finished = frame[frame["status"] == FINISHED] if not frame.empty else frame
    have = finished[finished["spread_pct"].notna()] if not finished.empty else finished
    if have.empty:
        return no_value_cell(frame)
    value = float(max(float(v) for v in have["spread_pct"]))
    return Cell(
        f"{value:.0f}",
        value=value,
        n=len(have),
        status="ok",
        mark=UNRELIABLE_MARK if value > SPREAD_LIMIT_PCT else "",
        run_ids=ids(have),
        source=f"largest over {len(have)} run(s)",
    )


def with_step_spread(runs: Runs, pool: pd.DataFrame) -> pd.DataFrame:
    """`pool` with each run's `spread_pct` (timed-step spread, %): the row's own field when the rows carry it, else
    read from the run's stored record (None where neither has it)."""
    if "spread_pct" in pool.columns:
        return pool
    values: list[float | None] = []
    store = ResultStore(runs.root) if runs.root is not None else None
    for run_id, status in zip(pool["run_id"], pool["status"], strict=True):
        record = store.load(str(run_id)) if store is not None and status == FINISHED else None
        values.append(_first_number(flat_efficiency((record or {}).get("efficiency")).get("spread_pct")))
    return pool.assign(spread_pct=values)


def resolve_dataset(df: pd.DataFrame, dataset: str) -> str:
    """The column label of a dataset given by label or name; ValueError if none or several contents match."""
    if df.empty:
        raise ValueError(f"--dataset {dataset}: no runs stored")
    if (df["dataset"] == dataset).any():
        return dataset
    labels = sorted({str(d) for d in df.loc[df["dataset_name"] == dataset, "dataset"]})
    if not labels:
        found = ", ".join(sorted({str(d) for d in df["dataset"].dropna()}))
        raise ValueError(f"--dataset {dataset}: no stored run on it; stored datasets: {found}")
    if len(labels) > 1:
        raise ValueError(f"--dataset {dataset}: several contents share that name; give one of: {', '.join(labels)}")
    return labels[0]


def table_efficiency(
    runs: Runs, sel: Selection, dataset: str | None = None, reference: Sequence[str] = REFERENCE_METHODS
) -> Table | None:
    """Table II: FLOPs, total training time, throughput, peak/average power and energy per method on one
    dataset, plus FPT+'s preloading step as its own row."""
    pool = sel.runs
    finished = pool[pool["status"] == FINISHED]
    if finished.empty:
        return None
    dataset = resolve_dataset(runs.df, dataset) if dataset else most_common(finished["dataset"])
    weights = most_common(finished[finished["dataset"] == dataset]["weights"])
    if weights is None:
        return None  # no finished run on that dataset at the main setting
    pool = with_step_spread(runs, select_hparams(_filter(pool, dataset=dataset, weights=weights), ["method"]))
    units = sorted({str(u) for u in pool.loc[pool["status"] == FINISHED, "flops_unit"].dropna()})
    has_spread = bool(pool.loc[pool["status"] == FINISHED, "spread_pct"].notna().any())
    has_no_attention = "fwd_gflops_no_attention" in pool and bool(
        pool.loc[pool["status"] == FINISHED, "fwd_gflops_no_attention"].notna().any()
    )
    columns = [
        Column("flops", "FLOPs (G)", "min", 6),
        *([Column("flops_no_attention", "FLOPs, no attention (G)", "min", 6)] if has_no_attention else []),
        Column("time", "Total training time (s)", "min", 2),
        Column("throughput", "Throughput (img/s)", "max", 2),
        *([Column("spread", "Step spread (%)", None, 0)] if has_spread else []),
        Column("peak_w", "Peak power (W)", "min", 2),
        Column("mean_w", "Avg. power (W)", "min", 2),
        Column("energy", "Energy (kJ)", "min", 2),
    ]
    rows: list[Row] = []
    notes = [
        "FLOPs: forward pass per image as recorded by the profiler"
        + (
            f"; unit: {units[0]}."
            if len(units) == 1
            else f"; units differ between runs: {', '.join(units)}."
            if units
            else "; none recorded by these runs."
        ),
        "FLOPs, no attention: the same count without attention's Q·Kᵀ and P·V, the papers' convention (fvcore's "
        "default on fused attention; ViT-B/16 at 512 px: 87.8 G, against 107.1 G with attention).",
        "Total training time: wall time of all training epochs (each epoch's validation pass included); "
        "throughput: median training-step images/s. Power: peak and mean board power over training; energy over "
        "training (kJ).",
        "'n/a' = power could not be measured on that device (no NVML).",
    ]
    for method in runs.sort_methods(pool["method"].unique()):
        if method in ("fpt", FPT_PLUS) and not any(r.key == "preload" for r in rows):
            rows.extend(_preload_rows(pool, runs.df, notes))
        rows.append(
            Row(
                runs.label(method),
                method,
                _efficiency_cells(pool[pool["method"] == method]),
                ranked=method not in reference,
            )
        )
    if has_spread:
        notes.append(SPREAD_NOTE)
    table = Table(
        key="table2_efficiency",
        number="II",
        title=f"Training efficiency per method on {dataset}",
        caption=(
            f"Training cost of every method at its default options on {dataset} ({weights}); {sel.describe()}; "
            "mean over seeds. The preloading row is FPT+'s one-off pass of the frozen large model that stores its "
            "features before training; it is not ranked. " + _rank_note(reference, runs)
        ),
        columns=columns,
        sections=[Section("", rows)],
        notes=notes + _device_notes(pool) + _failure_notes(pool),
    )
    highlight(table)
    return table


def _preload_rows(pool: pd.DataFrame, all_runs: pd.DataFrame, notes: list[str]) -> list[Row]:
    """Table II's preloading row (empty when there are no FPT+ runs)."""
    fpt_runs = pool[pool["method"] == FPT_PLUS]
    if fpt_runs.empty:
        return []
    builders, preload_notes = _preload_builders(fpt_runs, all_runs)
    frame = _preload_frame(builders)
    notes.extend(preload_notes)
    if frame.empty:
        notes.append("Preloading: no stored run timed the building of FPT+'s feature cache.")
    return [Row("Preloading (FPT+)", "preload", _efficiency_cells(frame), ranked=False)]


def table_resolution(
    runs: Runs,
    gpu_mem_mb: float | None,
    backbone: str | None = None,
    reference: Sequence[str] = REFERENCE_METHODS,
    gpu_label: str = "",
    filters: Mapping[str, Any] | None = None,
) -> Table | None:
    """Table III: peak memory and average AUC per method across input resolutions for one backbone.

    Weights, batch size and epochs are chosen jointly (`choose_setting`); `filters` other than `res` apply.
    """
    pool = runs.df[runs.df["is_default"]] if not runs.df.empty else runs.df
    pool = apply_filters(pool, {k: v for k, v in (filters or {}).items() if k != "res"})
    if pool.empty:
        return None
    if backbone is None:
        spread = pool.groupby("backbone")["res"].nunique()
        sizes = pool.groupby("backbone").size()
        backbone = max(spread.index, key=lambda b: (spread[b], sizes[b], str(b)))
    pool = pool[pool["backbone"] == backbone]
    if pool.empty:
        return None
    setting, _ = choose_setting(pool, ("weights", "batch_size", "epochs"))
    weights, batch_size, epochs = setting["weights"], setting["batch_size"], setting["epochs"]
    pool = _filter(pool, weights=weights, batch_size=batch_size, epochs=epochs)
    resolutions = sorted(int(r) for r in pool["res"].dropna().unique())
    datasets = sorted(pool["dataset"].dropna().unique())
    columns = [Column(f"mem:{r}", str(r), "min", 0, group="Memory (MiB)") for r in resolutions]
    columns += [Column(f"auc:{r}", str(r), "max", 2, group="Average AUC") for r in resolutions]
    rows = []
    for method in runs.sort_methods(pool["method"].unique()):
        cells: dict[str, Cell] = {}
        for res in resolutions:
            sub = select_hparams(pool[(pool["method"] == method) & (pool["res"] == res)], ["dataset"])
            mem = memory_cell(sub, gpu_mem_mb)
            if mem.status in ("oom", "over_budget"):
                avg = Cell(OOM, status=mem.status, run_ids=mem.run_ids)
            else:
                avg = average_cell([mean_cell(sub[sub["dataset"] == d], "test_auc", 2) for d in datasets])
            cells[f"mem:{res}"], cells[f"auc:{res}"] = mem, avg
        rows.append(Row(runs.label(method), method, cells, ranked=method not in reference))
    budget = f"{gpu_mem_mb:,.0f} MiB" if gpu_mem_mb else "no budget set"
    table = Table(
        key="table3_resolution",
        number="III",
        title=f"Memory and average AUC across input resolutions ({backbone})",
        caption=(
            f"Peak training memory (MiB) and average test AUC over {len(datasets)} dataset(s) of every method at "
            f"its default options, {backbone} ({weights}), batch {batch_size}, {epochs} epochs, at input "
            f"resolutions {', '.join(map(str, resolutions))} px. '/' = out of memory: the run ran out of memory, "
            f"or its memory exceeds the chosen GPU budget ({gpu_label or budget}). " + _rank_note(reference, runs)
        ),
        columns=columns,
        sections=[Section("", rows)],
        notes=[MEM_NOTE, MISSING_NOTE, *_failure_notes(pool)],
        meta={
            "backbone": backbone,
            "weights": weights,
            "batch_size": batch_size,
            "epochs": epochs,
            "resolutions": resolutions,
            "datasets": datasets,
        },
    )
    highlight(table)
    return table


@dataclass(frozen=True)
class SweepSpec:
    """An FPT+ option sweep: the option, the table/figure number and titles."""

    option: str
    key: str
    number: str
    title: str
    header: str


SWEEPS = {
    "side_res": SweepSpec(
        "side_res",
        "table4_side_res",
        "IV",
        "FPT+ with different input resolutions for the side network",
        "Side input (px)",
    ),
    "num_prompts": SweepSpec(
        "num_prompts", "table5_prompts", "V", "FPT+ with different numbers of fine-grained prompts", "# Prompts"
    ),
    "reduction": SweepSpec(
        "reduction", "table6_reduction", "VI", "FPT+ with different reduction factors", "Reduction factor"
    ),
    "side_layers": SweepSpec(
        "side_layers", "figure5_side_layers", "5", "FPT+ with different numbers of side layers", "Side layers"
    ),
    "token_ratio": SweepSpec(
        "token_ratio", "figure8_token_ratio", "8", "FPT+ with different ratios of important tokens", "Token ratio"
    ),
}


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Sort numbers numerically, then anything else as text."""
    number = _first_number(value)
    return (0, number, "") if number is not None else (1, 0.0, str(value))


def sweep_runs(runs: Runs, sel: Selection, options: Sequence[str], method: str = FPT_PLUS) -> pd.DataFrame:
    """Runs of `method` at the main setting whose only non-default options are among `options`."""
    df = runs.df
    if df.empty or (sel.backbone is None and sel.res is None):
        return df.iloc[0:0]
    pool = _filter(df, method=method, backbone=sel.backbone, res=sel.res, batch_size=sel.batch_size, epochs=sel.epochs)
    pool = apply_filters(pool, sel.filters)
    allowed = set(options)
    keep = [set(nd).issubset(allowed) for nd in pool["nondefault"]]
    return pool[keep]


def table_sweep(runs: Runs, sel: Selection, spec: SweepSpec, method: str = FPT_PLUS) -> Table | None:
    """Tables IV–VI (and the data of Figures 5, 8): Avg. AUC, Params, Mem., PPE, PME per option value."""
    pool = sweep_runs(runs, sel, [spec.option], method)
    if pool.empty:
        return None
    weights = most_common(pool.loc[pool["status"] == FINISHED, "weights"]) or most_common(pool["weights"])
    pool = pool[pool["weights"] == weights]
    default = runs.defaults.get(method, {}).get(spec.option)
    values = [opts.get(spec.option, default) for opts in pool["options"]]
    pool = pool.assign(sweep_value=[canonical(v) for v in values])
    shown = {canonical(v): v for v in values}
    if len(shown) < 2:
        return None
    per_value = {v: select_hparams(pool[pool["sweep_value"] == v], ["dataset"]) for v in shown}
    with_results = [set(g.loc[g["status"] == FINISHED, "dataset"]) for g in per_value.values()]
    common = set.intersection(*with_results) if all(with_results) else set()
    datasets = sorted(common or set(pool["dataset"].dropna()))
    full_pool = _filter(
        apply_filters(runs.df[runs.df["is_default"]], sel.filters),
        backbone=sel.backbone,
        res=sel.res,
        batch_size=sel.batch_size,
        epochs=sel.epochs,
        weights=weights,
    )
    full = _full_reference(full_pool)
    columns = [
        Column("avg", "Avg. AUC", "max", 2),
        Column("params", "Params (%)", "min", 4),
        Column("mem", "Mem. (MiB)", "min", 0),
        Column("ppe", "PPE", "max", 2),
        Column("pme", "PME", "max", 2),
    ]
    rows = []
    for key in sorted(shown, key=lambda k: _sort_key(shown[k])):
        value = shown[key]
        label = f"{value} (default)" if canonical(value) == canonical(default) else str(value)
        rows.append(Row(label, key, summary_cells(per_value[key], datasets, full)))
    table = Table(
        key=spec.key,
        number=spec.number,
        title=spec.title,
        caption=(
            f"{spec.title}: every other option at its default; {sel.describe()}, weights {weights}. Avg. AUC over "
            f"{len(datasets)} dataset(s) ({', '.join(datasets)}) that every row has. PME's m is relative to full "
            f"fine-tuning's memory at the same setting"
            + ("" if full[0].has_value else " (no full fine-tuning run: PME '—')")
            + ". Best bold, second underlined."
        ),
        columns=columns,
        sections=[Section("", rows)],
        notes=[MEM_NOTE, MISSING_NOTE, *_failure_notes(pool)],
        row_header=spec.header,
    )
    highlight(table)
    return table


# Figure 7's cumulative steps: each adds one component of FPT+ (option names of the fpt_plus method).
COMPONENTS = ("use_lpm", "fusion", "asymmetric", "token_selection", "preload")
COMPONENT_LABELS = (
    "Side network only",
    "+ LPM knowledge (MLP)",
    "+ Fusion modules",
    "+ Asymmetric input",
    "+ Token selection",
    "+ Preloading (FPT+)",
)


def enabled(value: Any) -> bool:
    """Whether a component option is switched on (False/0/"off"/"none"/"mlp" mean off)."""
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "off", "none", "mlp")
    return bool(value)


def component_points(runs: Runs, sel: Selection, method: str = FPT_PLUS) -> tuple[list[dict[str, Any]], list[str]]:
    """Figure 7's data: per cumulative step, average AUC and memory of the matching FPT+ runs.

    A run belongs to step k when its first disabled component (in `COMPONENTS` order) is the k-th (all
    enabled: the last step, the default FPT+). When several option sets land on one step, the one with the
    most later components switched off (the exact cumulative pattern) wins, then the one with most runs.
    """
    pool = sweep_runs(runs, sel, COMPONENTS, method)
    notes: list[str] = []
    if pool.empty:
        return [], notes
    weights = most_common(pool.loc[pool["status"] == FINISHED, "weights"]) or most_common(pool["weights"])
    pool = pool[pool["weights"] == weights]
    defaults = runs.defaults.get(method, {})
    steps, exactness = [], []
    for opts in pool["options"]:
        flags = [enabled(opts.get(c, defaults.get(c, True))) for c in COMPONENTS]
        step = flags.index(False) if False in flags else len(COMPONENTS)
        steps.append(step)
        exactness.append(sum(not f for f in flags[step:]))
    pool = pool.assign(step=steps, exactness=exactness)
    chosen_runs = {}
    for step in sorted(pool["step"].unique()):
        group = pool[pool["step"] == step]
        choices = group.groupby("options_json").agg(exact=("exactness", "max"), n=("run_id", "size"))
        chosen = max(choices.index, key=lambda k: (choices.loc[k, "exact"], choices.loc[k, "n"]))
        chosen_runs[int(step)] = (chosen, select_hparams(group[group["options_json"] == chosen], ["dataset"]))
    with_results = [set(sub.loc[sub["status"] == FINISHED, "dataset"]) for _, sub in chosen_runs.values()]
    datasets = sorted(set.intersection(*with_results) if all(with_results) else set())
    if datasets:
        notes.append(f"averages over the dataset(s) every step has: {', '.join(datasets)}")
    points = []
    for step, (chosen, sub) in chosen_runs.items():
        cells = summary_cells(sub, datasets, None)
        points.append(
            {
                "step": int(step),
                "label": COMPONENT_LABELS[int(step)],
                "avg_auc": cells["avg"].value if cells["avg"].has_value else None,
                "mem_mb": cells["mem"].value if cells["mem"].has_value else None,
                "mem_source": cells["mem"].source,
                "options": chosen,
                "n_runs": len(sub),
                "run_ids": ";".join(ids(sub)),
            }
        )
    if len(points) < 2:
        notes.append("fewer than two component-ablation steps have runs")
    return points, notes


def table_points(table: Table) -> list[dict[str, Any]]:
    """A sweep table's rows as plain dicts (x label, avg_auc, params_pct, mem_mb, ppe, pme, run ids)."""
    points = []
    for section in table.sections:
        for row in section.rows:

            def val(key: str, cells: dict[str, Cell] = row.cells) -> float | None:
                """The cell's value when it holds a usable number."""
                cell = cells.get(key)
                return cell.value if cell is not None and cell.has_value and cell.status == "ok" else None

            points.append(
                {
                    "x": row.label.replace(" (default)", ""),
                    "default": row.label.endswith("(default)"),
                    "label": row.label,
                    "avg_auc": val("avg"),
                    "params_pct": val("params"),
                    "mem_mb": val("mem"),
                    "mem_estimated": row.cells.get("mem", Cell()).mark == ESTIMATED_MARK,
                    "ppe": val("ppe"),
                    "pme": val("pme"),
                    "run_ids": ";".join(_sum_ids(row.cells.values())),
                }
            )
    return points
