"""`build_report`: every table and figure that the stored runs allow, plus `index.md` linking them."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from petlbench.core.atomic import write_text_atomic
from petlbench.core.results import FINISHED, utc_now
from petlbench.reports import figures as figs
from petlbench.reports import tables as tbl
from petlbench.reports.bootstrap import NOT_AVAILABLE, table_ci
from petlbench.reports.collect import HPARAM_RULE, DefaultsFn, Runs, load_runs
from petlbench.reports.introspection import (
    FIG6_KEYS,
    FIG9_KEYS,
    foreground_counts,
    foreground_fraction,
    load_introspection,
    one_per_class,
)
from petlbench.reports.model import Table
from petlbench.reports.render import write_table

DEFAULT_GPU_MEM = "48GB"
PAPER_GPU_GIB = 48  # the papers' NVIDIA RTX A6000
ESTIMATE_STEM = "figure2_memory_estimate"
INDEX_NAME = "index.md"


def parse_gpu_mem(text: str | int | float) -> int:
    """GPU memory in bytes from "48GB", "48GiB", "80 GB", "49152MB" or a plain number of bytes.

    GB and GiB both mean 2^30 bytes and MB/MiB 2^20: GPU vendors' "48 GB" cards hold 48 GiB.
    """
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"GPU memory {text!r}: use e.g. 48GB, 80GiB or 24576MB")
    number, prefix = float(match.group(1)), match.group(2).upper()
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[prefix]
    return int(number * scale)


def gpu_label(mem_bytes: int) -> str:
    """A short human label of a GPU memory budget ("48 GiB")."""
    gib = mem_bytes / 2**30
    return f"{round(gib)} GiB" if math.isclose(gib, round(gib)) else f"{gib:.1f} GiB"


def gpu_caption(mem_bytes: int) -> str:
    """The budget for captions, naming the papers' GPU when it is the one."""
    label = gpu_label(mem_bytes)
    return f"{label}, the papers' RTX A6000" if math.isclose(mem_bytes / 2**30, PAPER_GPU_GIB) else label


@dataclass
class Entry:
    """One line of index.md: a table or figure, its files, caption, or why it is not available."""

    kind: str  # "Table" or "Figure"
    number: str
    caption: str
    files: dict[str, Path] = field(default_factory=dict)
    reason: str = ""


def _stems(out: Path, stem: str, suffixes: Sequence[str]) -> None:
    """Delete `<stem>.<suffix>` outputs of an item that is no longer available."""
    for suffix in suffixes:
        (out / f"{stem}.{suffix}").unlink(missing_ok=True)


def _write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write a DataFrame as CSV atomically."""
    write_text_atomic(path, frame.to_csv(index=False))
    return path


def _figure_files(paths: list[Path], data: Path | None = None) -> dict[str, Path]:
    """Index links of a figure: PNG, PDF and its data CSV."""
    files = {p.suffix.lstrip(".").upper(): p for p in paths}
    if data is not None:
        files["data CSV"] = data
    return files


class ReportBuilder:
    """Builds the report items one by one, collecting index entries (a failure in one item is reported)."""

    def __init__(
        self,
        runs: Runs,
        out: Path,
        gpu_mem_bytes: int,
        backbone: str | None,
        res: int | None,
        table3_backbone: str | None,
        dataset: str | None,
        filters: Mapping[str, Any] | None = None,
    ) -> None:
        """Remember the runs, output folder, GPU budget and the main setting (ValueError for a filter that matches
        no stored run)."""
        self.runs, self.out = runs, out
        self.gpu_mem_mb = gpu_mem_bytes / 2**20
        self.gpu_text = gpu_label(gpu_mem_bytes)
        self.gpu_caption = gpu_caption(gpu_mem_bytes)
        self.sel = tbl.select_main(runs, backbone, res, filters)
        self.table3_backbone, self.dataset = table3_backbone, dataset
        self.entries: list[Entry] = []
        self.table1: Table | None = None
        self.table3: Table | None = None

    def guarded(self, kind: str, number: str, stem: str, suffixes: Sequence[str], fn: Callable[[], Entry]) -> None:
        """Run one item's builder; an exception becomes a "not available" entry naming the error."""
        try:
            entry = fn()
        except Exception as err:  # noqa: BLE001 - one broken item must not sink the whole report
            entry = Entry(kind, number, "", reason=f"error while building: {type(err).__name__}: {err}")
        if entry.reason:
            _stems(self.out, stem, suffixes)
        self.entries.append(entry)

    def table(self, number: str, stem: str, build: Callable[[], Table | None], missing: str) -> None:
        """Build, write and index one table."""

        def run() -> Entry:
            """Build the item and return its index entry."""
            table = build()
            if table is None:
                return Entry("Table", number, "", reason=missing)
            if number == "I":
                self.table1 = table
            if number == "III":
                self.table3 = table
            paths = write_table(table, self.out)
            files = {"Markdown": paths["md"], "LaTeX": paths["tex"], "CSV": paths["csv"]}
            return Entry("Table", number, table.title, files=files)

        self.guarded("Table", number, stem, ("md", "tex", "csv"), run)

    def figure(self, number: str, stem: str, draw: Callable[[Path], tuple[str, dict[str, Path]] | str]) -> None:
        """Draw and index one figure; `draw` returns (caption, files) or a reason it is not available."""

        def run() -> Entry:
            """Build the item and return its index entry."""
            result = draw(self.out / stem)
            if isinstance(result, str):
                return Entry("Figure", number, "", reason=result)
            caption, files = result
            return Entry("Figure", number, caption, files=files)

        self.guarded("Figure", number, stem, ("png", "pdf", "csv"), run)

    # ---- figures -------------------------------------------------------------------------------------

    def fig1(self, stem: Path) -> tuple[str, dict[str, Path]] | str:
        """Figure 1 from Table I's first section."""
        if self.table1 is None:
            return "Table I is not available"
        section = self.table1.sections[0]
        points = []
        for row in section.rows:
            cells = row.cells
            points.append(
                {
                    "method": row.key,
                    "label": row.label,
                    "ratio_pct": cells["params"].value if cells["params"].has_value else None,
                    "avg_auc": cells["avg"].value if cells["avg"].has_value and cells["avg"].status == "ok" else None,
                    "mem_mb": cells["mem"].value if cells["mem"].has_value and cells["mem"].status == "ok" else None,
                    "mem_estimated": bool(cells["mem"].mark),
                    **self._seed_spread(cells["avg"].run_ids),
                    "run_ids": ";".join(cells["avg"].run_ids),
                }
            )
        usable = [p for p in points if p["ratio_pct"] is not None and p["avg_auc"] is not None]
        if not usable:
            return "no method has both an average AUC over every dataset and a parameter count"
        data = _write_csv(pd.DataFrame(points), stem.with_suffix(".csv"))
        estimated = any(p["mem_estimated"] for p in usable)
        paths = figs.figure_auc_vs_params(
            usable,
            stem,
            order=self.runs.order,
            title=f"Average AUC vs. trainable parameters ({self.sel.backbone}, {self.sel.res} px)\ndot area ∝ "
            + ("estimated " if estimated else "")
            + "peak training memory",
        )
        return (
            f"Average test AUC against trainable-parameter ratio, dot area ∝ peak training memory "
            f"({section.title}; {self.sel.describe()}).",
            _figure_files(paths, data),
        )

    def _seed_spread(self, run_ids: Sequence[str]) -> dict[str, Any]:
        """Figure 1's seed counts of an average AUC (fewest and most seeds per dataset) and its std over seeds: the
        sample std of the per-seed averages over the datasets, from the seeds that ran on every dataset."""
        df = self.runs.df
        runs = df[df["run_id"].isin(list(run_ids)) & (df["status"] == FINISHED) & df["test_auc"].notna()]
        if runs.empty:
            return {"n_seeds": None, "n_seeds_max": None, "auc_std": None}
        counts = runs.groupby("dataset")["seed"].nunique()
        per_seed = runs.pivot_table(index="seed", columns="dataset", values="test_auc", aggfunc="mean").dropna()
        averages = per_seed.mean(axis=1)
        std = float(averages.std(ddof=1)) if len(averages) > 1 else None
        return {"n_seeds": int(counts.min()), "n_seeds_max": int(counts.max()), "auc_std": std}

    def fig2(self, stem: Path) -> tuple[str, dict[str, Path]] | str:
        """Figure 2 from Table III's memory cells, else the estimator's figure if present."""
        table = self.table3
        resolutions = {c.header for c in table.columns} if table is not None else set()
        if table is None or len(resolutions) < 2:
            return self._estimate_fallback("runs exist at fewer than two input resolutions")
        rows: list[dict[str, Any]] = []
        for row in table.sections[0].rows:
            for column in table.columns:
                if not column.key.startswith("mem:"):
                    continue
                cell = row.cells[column.key]
                rows.append(
                    {
                        "method": row.key,
                        "label": row.label,
                        "res": int(column.header),
                        "mem_mb": cell.value if cell.has_value else None,
                        "oom": cell.status == "oom",
                        "exceeds_budget": cell.status in ("oom", "over_budget"),
                        "source": cell.source,
                        "run_ids": ";".join(cell.run_ids),
                    }
                )
        if not any(r["mem_mb"] is not None or r["oom"] for r in rows):
            return self._estimate_fallback("no run at these resolutions recorded a memory figure")
        data = _write_csv(pd.DataFrame(rows), stem.with_suffix(".csv"))
        labels = {r["method"]: r["label"] for r in rows}
        backbone = table.meta.get("backbone")
        paths = figs.figure_memory_vs_resolution(
            rows,
            stem,
            self.gpu_mem_mb,
            self.gpu_text,
            labels,
            order=self.runs.order,
            title=f"Training memory vs. input resolution\n({backbone}, stored runs)",
        )
        return (
            f"Peak training memory against input resolution per method ({backbone}, stored runs); dashed line: "
            f"GPU memory ({self.gpu_caption}); × = out of memory.",
            _figure_files(paths, data),
        )

    def _estimate_fallback(self, reason: str) -> tuple[str, dict[str, Path]] | str:
        """The `petlbench plot memory` figure when runs cannot draw Figure 2."""
        _stems(self.out, "figure2_memory_vs_resolution", ("png", "pdf", "csv"))  # no stale run-based figure
        png = self.out / f"{ESTIMATE_STEM}.png"
        meta_path = self.out / f"{ESTIMATE_STEM}.json"
        if png.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            files = {"PNG": png, "PDF": png.with_suffix(".pdf"), "data CSV": png.with_suffix(".csv")}
            return (
                f"Estimated peak training memory against input resolution ({meta.get('backbone')}, batch "
                f"{meta.get('batch_size')}; from `petlbench plot memory`, not from runs: {reason}).",
                {k: v for k, v in files.items() if v.is_file()},
            )
        return f"{reason}; `petlbench plot memory` draws it from the memory estimator"

    def sweep_figure(self, option: str, stem: Path) -> tuple[str, dict[str, Path]] | str:
        """Figures 5 and 8 from an FPT+ option sweep."""
        spec = tbl.SWEEPS[option]
        table = tbl.table_sweep(self.runs, self.sel, spec)
        if table is None:
            return f"no FPT+ runs varying {option} (with every other option at its default) at the main setting"
        points = tbl.table_points(table)
        data = _write_csv(pd.DataFrame(points), stem.with_suffix(".csv"))
        estimated = any(p["mem_estimated"] for p in points)
        paths = figs.figure_sweep(
            points,
            stem,
            spec.header,
            title=spec.title,
            mem_label="Peak training memory (MiB" + (", estimated)" if estimated else ")"),
        )
        return f"{spec.title}: average AUC, PPE, PME (★ best AUC) and memory; {self.sel.describe()}.", _figure_files(
            paths, data
        )

    def fig7(self, stem: Path) -> tuple[str, dict[str, Path]] | str:
        """Figure 7 from the cumulative component ablation."""
        points, notes = tbl.component_points(self.runs, self.sel)
        if len(points) < 2:
            return (
                "fewer than two component-ablation steps of FPT+ have runs (options " + ", ".join(tbl.COMPONENTS) + ")"
            )
        data = _write_csv(pd.DataFrame(points), stem.with_suffix(".csv"))
        estimated = any(p["mem_source"] != "measured" for p in points if p["mem_mb"] is not None)
        paths = figs.figure_components(
            points,
            stem,
            title="Impact of each FPT+ component (cumulative)",
            mem_label="Peak training memory (MiB" + (", estimated)" if estimated else ")"),
        )
        return (
            f"Cumulative component ablation of FPT+: average AUC and peak memory per step; {self.sel.describe()}.",
            _figure_files(paths, data),
        )

    def _introspected(self, methods: Sequence[str], keys: Sequence[str]) -> list[tuple[str, dict[str, np.ndarray]]]:
        """(run id, arrays) of finished runs whose introspection.npz has `keys`."""
        df = self.runs.df
        if df.empty or self.runs.root is None:
            return []
        found = []
        pool = df[(df["status"] == FINISHED) & df["method"].isin(list(methods))]
        pool = pool.assign(
            _main=(pool["is_default"]) & (pool["backbone"] == self.sel.backbone),
            _rank=pool["method"].map(list(methods).index),  # the caller's preference ("fpt" sorts before "fpt_plus")
        )
        main = []
        for _, run in pool.sort_values(["_main", "_rank", "run_id"], ascending=[False, True, True]).iterrows():
            arrays = load_introspection(self.runs.root / str(run["run_id"]))
            if arrays and all(k in arrays for k in keys):
                found.append((str(run["run_id"]), arrays))
                if run["_main"]:
                    main.append(found[-1])
        return main or found  # default-option runs at the main backbone when there are any

    def fig6(self, stem: Path) -> tuple[str, dict[str, Path]] | str:
        """Figure 6: per-layer prompt attention averaged over runs per method."""
        found = self._introspected(["fpt", "fpt_plus"], FIG6_KEYS)
        if not found:
            return "no finished FPT/FPT+ run has introspection.npz with layer_prompt_attention"
        by_method: dict[str, list[np.ndarray]] = {}
        ids: dict[str, list[str]] = {}
        for run_id, arrays in found:
            method = str(self.runs.df.loc[self.runs.df["run_id"] == run_id, "method"].iloc[0])
            by_method.setdefault(method, []).append(arrays["layer_prompt_attention"])
            ids.setdefault(method, []).append(run_id)
        series, rows = {}, []
        for method, arrays_list in by_method.items():
            depth = max(len(a) for a in arrays_list)
            same = [a for a in arrays_list if len(a) == depth]
            mean = np.mean(np.stack(same), axis=0)
            series[self.runs.label(method)] = mean
            rows += [
                {
                    "method": method,
                    "layer": i + 1,
                    "mean_attention": float(v),
                    "n_runs": len(same),
                    "run_ids": ";".join(ids[method]),
                }
                for i, v in enumerate(mean)
            ]
        data = _write_csv(pd.DataFrame(rows), stem.with_suffix(".csv"))
        paths = figs.figure_prompt_attention(series, stem)
        return (
            "Average attention that side tokens pay to the fine-grained prompts, per side layer "
            f"(mean over {sum(len(v) for v in ids.values())} run(s)).",
            _figure_files(paths, data),
        )

    def fig9(self, stem: Path) -> tuple[str, dict[str, Path]] | str:
        """Figure 9 from the first run with token-level introspection arrays: one image per class, the share of
        selected tokens on the images' foreground in the subtitle and the data CSV."""
        found = self._introspected(["fpt_plus", "fpt"], FIG9_KEYS)
        if not found:
            return "no finished FPT+/FPT run has introspection.npz with images, token_indices and token_attention"
        run_id, arrays = found[0]
        run = self.runs.df.loc[self.runs.df["run_id"] == run_id].iloc[0]
        method, weights = str(run["method"]), str(run["weights"])
        labels = arrays.get("labels")
        shown = one_per_class(labels, len(arrays["images"]))
        patch, prefix = int(arrays["patch_size"]), int(arrays.get("num_prefix_tokens", 1))
        every = arrays.get("selected_indices")
        samples: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        for i in shown:
            image = arrays["images"][i]
            grid = (image.shape[0] // patch, image.shape[1] // patch)
            chosen = every[i] if every is not None else arrays["token_indices"][i]
            on, total = foreground_counts(image[None], np.asarray(chosen)[None], grid, prefix)
            samples.append(
                {
                    "image": image,
                    "token_indices": arrays["token_indices"][i],
                    "token_attention": arrays["token_attention"][i],
                    "selected_indices": every[i] if every is not None else None,
                    "patch_size": patch,
                    "num_prefix_tokens": prefix,
                    "title": f"class {int(labels[i])}:" if labels is not None else "",
                }
            )
            rows.append(
                {
                    "run_id": run_id,
                    "method": method,
                    "weights": weights,
                    "image": i,
                    "label": int(labels[i]) if labels is not None else None,
                    "selected_patch_tokens": int(total[0]),
                    "on_foreground": int(on[0]),
                    "foreground_fraction": float(on[0] / total[0]) if total[0] else None,
                    "counted_over": "every layer and head" if every is not None else "the shown layer and head",
                }
            )
        images = np.stack([s["image"] for s in samples])
        chosen_all = every[shown] if every is not None else arrays["token_indices"][shown]
        grid = (images.shape[1] // patch, images.shape[2] // patch)
        overall = foreground_fraction(images, chosen_all, grid, prefix)
        rows.append(
            {
                **rows[-1],
                "image": "all",
                "label": None,
                "selected_patch_tokens": sum(r["selected_patch_tokens"] for r in rows),
                "on_foreground": sum(r["on_foreground"] for r in rows),
                "foreground_fraction": overall if math.isfinite(overall) else None,
            }
        )
        data = _write_csv(pd.DataFrame(rows).astype({"label": "Int64"}), stem.with_suffix(".csv"))
        where = f"layer {int(arrays['layer'])}" if "layer" in arrays else "top layer"
        where += f", head {int(arrays['head'])}" if "head" in arrays else ""
        paths = figs.figure_token_attention(
            samples,
            stem,
            title=f"Selected tokens and prompt attention ({where})",
            method=self.runs.label(method),
            run_id=run_id,
            weights=weights,
        )
        share = f"{100 * overall:.0f}% of selected tokens on the foreground" if math.isfinite(overall) else ""
        note = figs.background_note(overall, weights)
        return (
            f"Selected important tokens (boxes) and the prompts' attention over them ({where}; "
            f"{self.runs.label(method)}, run {run_id}, weights {weights}"
            + ("; one image per class" if labels is not None else "")
            + (f"; {share}" if share else "")
            + ")."
            + (f" {note}" if note else ""),
            _figure_files(paths, data),
        )


def build_report(
    results_dir: str | Path = "results",
    out_dir: str | Path = "reports",
    gpu_mem: str | int = DEFAULT_GPU_MEM,
    backbone: str | None = None,
    res: int | None = None,
    table3_backbone: str | None = None,
    dataset: str | None = None,
    defaults: DefaultsFn | None = None,
    filters: Sequence[str] | Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    param_convention: str = "petlbench",
) -> Path:
    """Write every available table (md/tex/csv) and figure (png/pdf) to `out_dir`; returns index.md's path.

    `filters` (`key=value` texts or a dict; keys backbone, res, batch_size, epochs, weights, dataset) and
    `backbone`/`res` fix parts of the main setting; the rest is the most common complete (backbone, resolution,
    batch size, epochs) tuple among the matching default-option runs. `table3_backbone` is Table III's backbone
    (default: the one with the most resolutions), `dataset` Table II's dataset (default: the most common),
    `gpu_mem` the budget of Table III and Figure 2. `log` receives warnings (an empty selection). ValueError for an
    unknown filter key, or a filter or `dataset` value that matches no stored run.
    """
    results_dir, out = Path(results_dir), Path(out_dir)
    gpu_bytes = parse_gpu_mem(gpu_mem)
    parsed = dict(filters) if isinstance(filters, Mapping) else tbl.parse_filters(filters)
    runs = load_runs(results_dir, defaults, param_convention)
    if dataset:
        dataset = tbl.resolve_dataset(runs.df, dataset)
    b = ReportBuilder(runs, out, gpu_bytes, backbone, res, table3_backbone, dataset, parsed)
    out.mkdir(parents=True, exist_ok=True)
    none_main = "no finished run at default options"
    if b.sel.empty and not runs.df.empty:
        none_main = f"no finished default-option run matches the selection ({b.sel.describe()})"
        if log is not None:
            log(none_main + (f" for {b.sel.filter_text()}" if b.sel.filters else ""))
    b.table("I", "table1_main", lambda: tbl.table_main(runs, b.sel), none_main)
    none_ii = none_main if b.sel.empty or not dataset else f"no finished run on {dataset} at the main setting"
    b.table("II", "table2_efficiency", lambda: tbl.table_efficiency(runs, b.sel, dataset), none_ii)
    b.table(
        "III",
        "table3_resolution",
        lambda: tbl.table_resolution(
            runs, b.gpu_mem_mb, table3_backbone, gpu_label=b.gpu_caption, filters=b.sel.filters
        ),
        "no run at default options" + (" matching the filters" if b.sel.filters else ""),
    )

    def sweep_table(spec: tbl.SweepSpec) -> Callable[[], Table | None]:
        """The builder of one option's sweep table (`b.sel` is read when it runs, as for the other tables)."""
        return lambda: tbl.table_sweep(runs, b.sel, spec)

    for number, option in (("IV", "side_res"), ("V", "num_prompts"), ("VI", "reduction")):
        spec = tbl.SWEEPS[option]
        b.table(
            number,
            spec.key,
            sweep_table(spec),
            f"no FPT+ runs varying {option} (other options at their defaults) at the main setting",
        )
    b.table("CI", "table_ci", lambda: table_ci(runs, b.sel), none_main if b.sel.empty else NOT_AVAILABLE)
    b.figure("1", "figure1_auc_vs_params", b.fig1)
    b.figure("2", "figure2_memory_vs_resolution", b.fig2)
    b.figure("5", "figure5_side_layers", lambda stem: b.sweep_figure("side_layers", stem))
    b.figure("6", "figure6_prompt_attention", b.fig6)
    b.figure("7", "figure7_components", b.fig7)
    b.figure("8", "figure8_token_ratio", lambda stem: b.sweep_figure("token_ratio", stem))
    b.figure("9", "figure9_token_attention", b.fig9)
    runs_csv = out / "runs.csv"
    flat = runs.df.drop(columns=["options", "preload", "nondefault"], errors="ignore")
    _write_csv(flat, runs_csv)
    return write_index(out, results_dir, runs, b, runs_csv)


def _link(path: Path, out: Path) -> str:
    """A link relative to the report folder."""
    try:
        return path.relative_to(out).as_posix()
    except ValueError:
        return path.as_posix()


def write_index(out: Path, results_dir: Path, runs: Runs, b: ReportBuilder, runs_csv: Path) -> Path:
    """Write index.md: provenance, the main setting, and one line per table/figure."""
    df = runs.df
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
    sel = b.sel
    lines = [
        "# petlbench report",
        "",
        f"Generated {utc_now()} from `{results_dir}` ({len(df)} stored run(s): {status}). "
        f"Every number comes from a stored run; each CSV lists the run ids behind each cell "
        f"([all runs]({_link(runs_csv, out)})).",
        "",
        f"Main setting (Tables I, II, IV–VI, CI; Figures 1, 5, 7, 8): default method options, {sel.describe()}"
        + (f" ({sel.chosen_by}" + (f"; {sel.filter_text()}" if sel.filters else "") + ")." if sel.backbone else "."),
        f"Setting rule: {tbl.SETTING_RULE}, among the runs matching the filters; each pre-trained weights value at "
        "that setting is its own section of Table I.",
        f"Hyperparameters: {HPARAM_RULE}",
        "Memory: measured CUDA peak where every run measured it, otherwise the estimator's figure (marked †). "
        "'—' = no finished run; '/' = out of memory (in Table III also: above the GPU budget of "
        f"{b.gpu_caption}). Mean ± std over seeds; '± —' = a single seed.",
    ]
    if sel.empty and not df.empty:
        lines += ["", f"**No finished default-option run matches the selection** ({sel.describe()})."]
    if runs.notes:
        lines += ["", *[f"> note: {n}" for n in runs.notes]]
    if sel.excluded:
        lines += ["", "## Runs not in Table I", ""]
        lines += [f"- {e.line()}" for e in sel.excluded]
    for kind in ("Table", "Figure"):
        lines += ["", f"## {kind}s", ""]
        for entry in (e for e in b.entries if e.kind == kind):
            name = f"{kind} {entry.number}"
            if entry.reason:
                lines.append(f"- {name} — *not available*: {entry.reason}.")
                continue
            links = " · ".join(f"[{fmt}]({_link(p, out)})" for fmt, p in entry.files.items())
            lines.append(f"- **{name}** — {entry.caption} {links}")
    lines += ["", "## Paper check", ""]
    if (out / "paper_check.md").is_file():
        lines.append(
            "- **Paper check** — the papers' printed efficiency values beside petlbench's under the paper preset, "
            "with the relative error per cell [md](paper_check.md) · [csv](paper_check.csv)"
        )
    else:
        lines.append("- Paper check — *not written yet*: run `petlbench paper-check` (estimator only, any machine).")
    path = out / INDEX_NAME
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def memory_estimate_figure(
    method_keys: Sequence[str],
    backbone: str,
    resolutions: Sequence[int],
    batch_size: int,
    gpu_mem: str | int = DEFAULT_GPU_MEM,
    out_dir: str | Path = "reports",
    rows: Sequence[dict[str, Any]] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Figure 2 from the memory estimator alone (no GPU, no runs): PNG, PDF, the rows as CSV, and a JSON
    sidecar the report's index uses. `rows` (method, res, est_peak_mem_mb, exceeds_budget) skips the estimator;
    `log` gets a line per estimate.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpu_bytes = parse_gpu_mem(gpu_mem)
    if rows is None:
        from petlbench.core.method import BackboneSpec
        from petlbench.profiling import memory_sweep

        rows = memory_sweep(
            list(method_keys), BackboneSpec(backbone), list(resolutions), batch_size, gpu_mem_bytes=gpu_bytes, log=log
        )
    labels = {}
    for key in {r["method"] for r in rows}:
        try:
            from petlbench.core.method import get_method

            labels[key] = get_method(key).display_name
        except Exception:  # noqa: BLE001 - a label is cosmetic
            labels[key] = key
    stem = out / ESTIMATE_STEM
    data = _write_csv(pd.DataFrame(list(rows)), stem.with_suffix(".csv"))
    paths = figs.figure_memory_vs_resolution(
        rows,
        stem,
        gpu_bytes / 2**20,
        gpu_label(gpu_bytes),
        labels,
        order=list(method_keys),
        title=f"Estimated training memory vs. input resolution\n({backbone}, batch {batch_size})",
    )
    meta = {
        "backbone": backbone,
        "batch_size": batch_size,
        "resolutions": list(resolutions),
        "methods": list(method_keys),
        "gpu_mem_bytes": gpu_bytes,
        "generated": utc_now(),
    }
    write_text_atomic(stem.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    return [*paths, data]
