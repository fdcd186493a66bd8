"""The papers' figures, drawn from plain data (lists of dicts, arrays) with matplotlib's Agg canvas.

No pyplot and no global backend switch: every function builds a `Figure`, writes `<stem>.png` and
`<stem>.pdf`, and returns both paths. Inputs are plain Python/NumPy so tests can pass fixture values and
`petlbench plot memory` can pass the estimator's rows.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from petlbench.reports.introspection import foreground_counts, foreground_patches

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    # past tab10 (eleven built-in methods, plus plugins): dark hues none of the above is close to
    "#393b79",
    "#637939",
    "#843c39",
    "#7b4173",
    "#8c6d31",
    "#1b9e77",
    "#000000",
    "#66a61e",
    "#a6761d",
    "#6b6ecf",
)

MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "h", "<")


def new_figure(width: float, height: float) -> Figure:
    """A Figure on an Agg canvas (constrained layout), independent of pyplot's state."""
    # w_pad/h_pad: inches of margin around legends placed outside
    fig = Figure(figsize=(width, height), layout=ConstrainedLayoutEngine(w_pad=0.1, h_pad=0.08))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, stem: str | Path) -> list[Path]:
    """Write `<stem>.png` (150 dpi) and `<stem>.pdf`; returns the two paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150)
    fig.set_layout_engine("none")  # keep the layout just computed (in inches) instead of redoing it for the PDF
    fig.savefig(paths[1])
    return paths


def method_colors(keys: Sequence[str], order: Sequence[str] = ()) -> dict[str, str]:
    """A stable colour per method, distinct within one figure: the palette slot of its registry position when no
    other method of the figure has that colour, else the next free slot."""
    colors: dict[str, str] = {}
    ranked = sorted(dict.fromkeys(keys), key=lambda k: list(order).index(k) if k in order else len(order))
    for key in ranked:
        preferred = PALETTE[list(order).index(key) % len(PALETTE)] if key in order else None
        if preferred is None or preferred in colors.values():
            preferred = next((c for c in PALETTE if c not in colors.values()), "#333333")
        colors[key] = preferred
    return colors


def _finite(value: Any) -> bool:
    """True for a finite int or float."""
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def seed_text(point: Mapping[str, Any]) -> str:
    """A point's seed count for labels: "(n=5)", "(n=1–3)" when the datasets had different counts, "" if unknown."""
    low, high = point.get("n_seeds"), point.get("n_seeds_max", point.get("n_seeds"))
    if not isinstance(low, int) or low < 1:
        return ""
    return f"(n={low})" if not isinstance(high, int) or high <= low else f"(n={low}–{high})"


def size_key_values(values: Sequence[float], count: int = 3) -> list[float]:
    """Up to `count` round values spanning the positive finite `values` (min..max), for a bubble-size key.

    Round means 1, 2 or 5 times a power of ten where at least two such lie in the range (the smallest, the
    largest, and the one nearest the geometric middle), else two significant digits rounded inwards.
    """
    data = sorted(float(v) for v in values if _finite(v) and v > 0)
    if not data or count < 1:
        return []
    low, high = data[0], data[-1]
    if high <= low * 1.05 or count == 1:
        return [_round_sig(high, 2)]  # one size (or one entry): the largest, at two significant digits
    nice = [
        m * 10.0**k for k in range(math.floor(math.log10(low)), math.floor(math.log10(high)) + 1) for m in (1, 2, 5)
    ]
    inside = [v for v in nice if low <= v <= high]
    if len(inside) >= 2:
        picks = [inside[0], inside[-1]]
        middle = math.sqrt(low * high)
        inner = inside[1:-1]
        if count > 2 and inner:
            picks.append(min(inner, key=lambda v: abs(math.log(v / middle))))
    else:
        sources = (low, math.sqrt(low * high), high) if count > 2 else (low, high)
        picks = [_round_inward(v, low, high) for v in sources]
    return sorted(set(picks))[:count]


def _round_inward(value: float, low: float, high: float, digits: int = 2) -> float:
    """`value` at `digits` significant digits, rounded so that it stays within [low, high]."""
    rounded = _round_sig(value, digits)
    if rounded < low or rounded > high:
        scale = 10.0 ** (math.floor(math.log10(value)) - digits + 1)
        step = round(value / scale, 9)
        rounded = (math.ceil(step) if rounded < low else math.floor(step)) * scale
    return float(rounded)


def mem_text(mib: float) -> str:
    """A memory figure for keys and labels: "20,000 MiB", "7.5 MiB", never "0 MiB" for a positive value."""
    if mib >= 100:
        return f"{mib:,.0f} MiB"
    return f"{mib:.3g} MiB" if mib >= 1 else f"{mib:.2g} MiB"


def draw_auc_vs_params(points: Sequence[Mapping[str, Any]], title: str = "", order: Sequence[str] = ()) -> Figure:
    """Figure 1 on a new Figure (see `figure_auc_vs_params`)."""
    usable = [p for p in points if _finite(p.get("ratio_pct")) and _finite(p.get("avg_auc"))]
    if not usable:
        raise ValueError("Figure 1 needs at least one method with both a parameter ratio and an average AUC")
    colors = method_colors([p["method"] for p in usable], order)
    mems = [p["mem_mb"] for p in usable if _finite(p.get("mem_mb")) and p["mem_mb"] > 0]
    top = max(mems) if mems else 1.0
    max_area, hollow_area = 1400.0, 60.0

    def area(mem: float) -> float:
        """Marker area (pt²) proportional to memory, with a visible minimum."""
        return max(max_area * mem / top, 12.0)

    def has_mem(p: Mapping[str, Any]) -> bool:
        """True if the point has a memory figure (a filled bubble)."""
        return _finite(p.get("mem_mb")) and p["mem_mb"] > 0

    def size(p: Mapping[str, Any]) -> float:
        """The area a point is drawn with (hollow points: a fixed size)."""
        return area(p["mem_mb"]) if has_mem(p) else hollow_area

    fig = new_figure(8.2, 4.8)
    ax = fig.add_subplot()
    # large bubbles first and lowest: a small bubble is never hidden under a large one
    drawn = sorted(usable, key=size, reverse=True)
    for rank, p in enumerate(drawn):
        color = colors[p["method"]]
        if has_mem(p):
            ax.scatter(
                p["ratio_pct"],
                p["avg_auc"],
                s=size(p),
                color=color,
                alpha=0.6,
                edgecolors="black",
                linewidths=0.6,
                zorder=3 + rank,
            )
        else:
            ax.scatter(
                p["ratio_pct"],
                p["avg_auc"],
                s=hollow_area,
                facecolors="none",
                edgecolors=color,
                linewidths=1.5,
                zorder=3 + rank,
            )
    for p in usable:  # error bars above every bubble
        n_seeds = p.get("n_seeds")
        if isinstance(n_seeds, int) and n_seeds > 1 and _finite(p.get("auc_std")):
            ax.errorbar(
                p["ratio_pct"],
                p["avg_auc"],
                yerr=p["auc_std"],
                fmt="none",
                ecolor=colors[p["method"]],
                elinewidth=1.4,
                capsize=4,
                capthick=1.4,
                zorder=4 + len(drawn),
            )
    handles: list[Any] = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markersize=8,
            markerfacecolor=colors[p["method"]],
            markeredgecolor="black",
            alpha=0.8,
            label=" ".join(t for t in (str(p.get("label", p["method"])), seed_text(p)) if t),
        )
        for p in usable
    ]
    ax.set_xscale("log")
    if max(p["ratio_pct"] for p in usable) / min(p["ratio_pct"] for p in usable) < 100:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # label 2 and 5 on short ranges
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.set_xlabel("Trainable parameters (% of total, log scale)")
    ax.set_ylabel("Average test AUC (×100)")
    ax.grid(True, which="both", alpha=0.3)
    ratios = [p["ratio_pct"] for p in usable]
    lows = [p["avg_auc"] - (p.get("auc_std") if _finite(p.get("auc_std")) else 0.0) for p in usable]
    highs = [p["avg_auc"] + (p.get("auc_std") if _finite(p.get("auc_std")) else 0.0) for p in usable]
    ax.set_xlim(min(ratios) / 3, min(max(ratios) * 3, 200.0))  # ratios never exceed 100 %
    span = max(highs) - min(lows)
    pad = max(span * 0.15, 0.5)
    ax.set_ylim(min(lows) - pad, max(highs) + pad)
    if not all(has_mem(p) for p in usable):
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=8,
                markerfacecolor="none",
                markeredgecolor="grey",
                label="(hollow: memory\nnot recorded)",
            )
        )
    if any(isinstance(p.get("n_seeds"), int) and p["n_seeds"] > 1 and _finite(p.get("auc_std")) for p in usable):
        handles.append(Line2D([], [], color="grey", marker="_", markersize=10, label="± std over seeds"))
    fig.legend(
        handles=handles,
        title="Method (n = seeds)",
        loc="outside right upper",
        fontsize=8,
        title_fontsize=9,
        frameon=False,
    )
    if mems:
        size_handles = [
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=math.sqrt(area(m)),  # scatter sizes are areas (pt²), marker sizes diameters (pt)
                markerfacecolor="grey",
                markeredgecolor="black",
                alpha=0.5,
                label=mem_text(m),
            )
            for m in size_key_values(mems)
        ]
        fig.legend(
            handles=size_handles,
            title="Peak memory",
            loc="outside right lower",
            fontsize=8,
            title_fontsize=9,
            frameon=False,
            labelspacing=2.6,
            borderpad=2.4,
            handletextpad=2.6,
        )
    ax.set_title(title or "Average AUC vs. trainable parameters\n(dot area ∝ peak training memory)", fontsize=10)
    return fig


def figure_auc_vs_params(
    points: Sequence[Mapping[str, Any]], stem: str | Path, title: str = "", order: Sequence[str] = ()
) -> list[Path]:
    """Figure 1: average AUC against trainable-parameter ratio (log x), dot area ∝ memory, colour per method.

    Each point: method (key), label, ratio_pct, avg_auc, mem_mb (None: drawn as a hollow dot of fixed size),
    optional n_seeds (and n_seeds_max when the datasets had different counts; shown as "(n=…)") and auc_std (std
    over seeds of the average; an error bar when n_seeds > 1). Large bubbles are drawn first, small ones on top.
    """
    return save_figure(draw_auc_vs_params(points, title, order), stem)


def _plain_number(value: float, _pos: int | None = None) -> str:
    """Tick label without scientific notation: 0.01, 0.1, 1, 10, 100."""
    return f"{value:,.10f}".rstrip("0").rstrip(".") if value < 1 else f"{value:,.0f}"


def _round_sig(value: float, digits: int = 1) -> float:
    """`value` rounded to `digits` significant digits."""
    if value <= 0:
        return 0.0
    return round(value, -int(math.floor(math.log10(value))) + digits - 1)


LINESTYLES = ("-", "--", "-.", ":")


def line_styles(count: int) -> list[tuple[str, str]]:
    """(line style, marker) per series; no two of the first len(LINESTYLES) × len(MARKERS) share both.

    Series i takes style i mod 4 and marker (i + block) mod 10, the block (i // lcm(4, 10)) shifting the markers
    so the pairs repeat only after all 40 combinations.
    """
    cycle = math.lcm(len(LINESTYLES), len(MARKERS))
    return [(LINESTYLES[i % len(LINESTYLES)], MARKERS[(i + i // cycle) % len(MARKERS)]) for i in range(count)]


def spread_positions(values: Sequence[float], gap: float, low: float = 0.0, high: float = 1.0) -> list[float]:
    """`values` (e.g. label heights in axes fractions) moved apart to at least `gap`, kept within [low, high]
    where there is room, in their original order."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    placed = [float(values[i]) for i in order]
    for j in range(1, len(placed)):
        placed[j] = max(placed[j], placed[j - 1] + gap)
    overflow = placed[-1] - high if placed else 0.0
    if overflow > 0:
        placed[-1] -= overflow
        for j in range(len(placed) - 2, -1, -1):
            placed[j] = min(placed[j], placed[j + 1] - gap)
    if placed and placed[0] < low:
        shift = low - placed[0]
        placed = [v + shift for v in placed]  # more labels than room: keep the gaps, run past the top
    out = [0.0] * len(values)
    for i, v in zip(order, placed, strict=True):
        out[i] = v
    return out


def draw_memory_vs_resolution(
    rows: Sequence[Mapping[str, Any]],
    gpu_mem_mb: float | None = None,
    gpu_label: str = "",
    labels: Mapping[str, str] | None = None,
    title: str = "",
    order: Sequence[str] = (),
) -> Figure:
    """Figure 2 on a new Figure (see `figure_memory_vs_resolution`)."""
    labels = labels or {}
    by_method: dict[str, list[tuple[int, float | None, bool]]] = {}
    for row in rows:
        mem = row.get("mem_mb", row.get("est_peak_mem_mb"))
        by_method.setdefault(row["method"], []).append(
            (int(row["res"]), mem if _finite(mem) else None, bool(row.get("oom")))
        )
    if not any(m is not None or oom for pts in by_method.values() for _, m, oom in pts):
        raise ValueError("Figure 2 needs at least one memory value")
    colors = method_colors(list(by_method), order)
    styles = line_styles(len(by_method))
    fig = new_figure(8.8, 5.4)
    ax = fig.add_subplot()
    resolutions = sorted({r for pts in by_method.values() for r, _, _ in pts})
    ends: list[tuple[str, float, float]] = []  # (method, last resolution with a value, its memory in GiB)
    for i, (method, pts) in enumerate(by_method.items()):
        pts.sort()
        xs = [r for r, m, _ in pts if m is not None]
        ys = [m / 1024.0 for _, m, _ in pts if m is not None]
        linestyle, marker = styles[i]
        # line style × marker unique per method, every other marker hollow and the later lines thinner and on top:
        # identical curves (Prompt-tuning / Adapter / BitFit) still show each of their markers
        ax.plot(
            xs,
            ys,
            marker=marker,
            markersize=(7.5, 6.0, 4.5)[i % 3],
            markerfacecolor=colors[method] if i % 2 == 0 else "none",
            markeredgewidth=1.2,
            linewidth=(1.8, 1.5, 1.2)[i % 3],
            color=colors[method],
            linestyle=linestyle,
            label=labels.get(method, method),
            alpha=0.9,
            zorder=2 + i / max(len(by_method), 1),
        )
        if xs:
            ends.append((method, xs[-1], ys[-1]))
        ooms = [r for r, m, oom in pts if m is None and oom]
        if ooms and gpu_mem_mb:
            ax.scatter(ooms, [gpu_mem_mb / 1024.0] * len(ooms), marker="x", s=60, color=colors[method], zorder=4)
    if gpu_mem_mb:
        ax.axhline(
            gpu_mem_mb / 1024.0,
            color="red",
            linewidth=1.8,
            linestyle="--",
            label=f"GPU memory ({gpu_label or f'{gpu_mem_mb / 1024:.0f} GiB'})",
        )
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.set_xticks(resolutions)
    ax.set_xticklabels([str(r) for r in resolutions], rotation=45 if len(resolutions) > 6 else 0)
    ax.set_xlabel("Input resolution (px, square)")
    ax.set_ylabel("Peak training memory (GiB, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    _direct_labels(ax, ends, colors, labels)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncol=min(4, len(by_method) + 1))
    ax.set_title(title or "Training memory vs. input resolution", fontsize=10)
    return fig


def _direct_labels(
    ax: Any, ends: Sequence[tuple[str, float, float]], colors: Mapping[str, str], labels: Mapping[str, str]
) -> None:
    """Name each line at its right end: lines reaching the last resolution in the right margin (moved apart, with
    a leader to the end point), the others just right of their last point."""
    if not ends:
        return
    ax.autoscale_view()
    ax.set_xlim(*ax.get_xlim())  # freeze the limits the label positions are computed in
    ax.set_ylim(*ax.get_ylim())
    right = max(x for _, x, _ in ends)
    to_axes = ax.transAxes.inverted()
    margin = [(m, x, y) for m, x, y in ends if x == right]
    heights = [float(to_axes.transform(ax.transData.transform((x, y)))[1]) for _, x, y in margin]
    for (method, x, y), height in zip(margin, spread_positions(heights, gap=0.055), strict=True):
        ax.annotate(
            labels.get(method, method),
            xy=(x, y),
            xytext=(1.03, height),
            textcoords="axes fraction",
            va="center",
            ha="left",
            fontsize=8,
            color=colors[method],
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": colors[method], "linewidth": 0.7, "shrinkA": 0, "shrinkB": 3},
        )
    for method, x, y in ends:
        if x != right:
            ax.annotate(
                labels.get(method, method),
                xy=(x, y),
                xytext=(6, 0),
                textcoords="offset points",
                va="center",
                ha="left",
                fontsize=8,
                color=colors[method],
            )


def figure_memory_vs_resolution(
    rows: Sequence[Mapping[str, Any]],
    stem: str | Path,
    gpu_mem_mb: float | None = None,
    gpu_label: str = "",
    labels: Mapping[str, str] | None = None,
    title: str = "",
    order: Sequence[str] = (),
) -> list[Path]:
    """Figure 2: training memory against input resolution per method, with a line at the GPU's memory.

    Each row: method, res, and mem_mb or est_peak_mem_mb (MiB; None = unknown), optional `oom` (ran out of
    memory without a figure: drawn as × on the GPU line). Values above the budget are drawn as they are. Every
    method has its own line style × marker and a label at the right end of its line (legend below).
    """
    return save_figure(draw_memory_vs_resolution(rows, gpu_mem_mb, gpu_label, labels, title, order), stem)


def figure_sweep(
    points: Sequence[Mapping[str, Any]], stem: str | Path, x_label: str, title: str = "", mem_label: str = ""
) -> list[Path]:
    """Figures 5 and 8: per option value, average AUC, PPE and PME (left; ★ = best AUC) and memory (right).

    Each point: x (value shown on the axis), avg_auc, ppe, pme, mem_mb (any may be None).
    """
    if not points:
        raise ValueError("a sweep figure needs at least one point")
    xs = list(range(len(points)))
    ticks = [str(p["x"]) for p in points]
    fig = new_figure(9.0, 3.8)
    ax_auc, ax_mem = fig.subplots(1, 2)
    for key, name, style in (("avg_auc", "Avg. AUC", "o-"), ("ppe", "PPE", "s--"), ("pme", "PME", "^:")):
        pts = [(x, p.get(key)) for x, p in zip(xs, points, strict=True) if _finite(p.get(key))]
        if pts:
            ax_auc.plot([x for x, _ in pts], [y for _, y in pts], style, label=name, markersize=5)
    aucs = [(p.get("avg_auc"), x) for x, p in zip(xs, points, strict=True) if _finite(p.get("avg_auc"))]
    if aucs:
        best, at = max(aucs)
        ax_auc.plot(
            [at],
            [best],
            marker="*",
            markersize=16,
            color="gold",
            markeredgecolor="black",
            linestyle="",
            label="best AUC",
            zorder=5,
        )
    ax_auc.set_xticks(xs, ticks)
    ax_auc.margins(x=0.12)
    ax_auc.set_xlabel(x_label)
    ax_auc.set_ylabel("Score (AUC ×100)")
    ax_auc.grid(True, alpha=0.3)
    ax_auc.legend(fontsize=8, loc="best")
    ax_auc.set_title("Performance and efficiency", fontsize=10)
    mems = [p.get("mem_mb") if _finite(p.get("mem_mb")) else 0.0 for p in points]
    bars = ax_mem.bar(xs, mems, color="#4c72b0")
    for bar, p in zip(bars, points, strict=True):
        if not _finite(p.get("mem_mb")):
            ax_mem.annotate("—", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom")
    ax_mem.set_xticks(xs, ticks)
    ax_mem.set_xlabel(x_label)
    ax_mem.set_ylabel(mem_label or "Peak training memory (MiB)")
    ax_mem.grid(True, axis="y", alpha=0.3)
    ax_mem.set_title("Training memory", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, stem)


def figure_components(
    points: Sequence[Mapping[str, Any]], stem: str | Path, title: str = "", mem_label: str = ""
) -> list[Path]:
    """Figure 7: cumulative component ablation; average AUC (left) and memory (right) per step.

    Each point: label (step name, first step at the top), avg_auc, mem_mb (None shown as "—").
    """
    if not points:
        raise ValueError("Figure 7 needs at least one ablation step")
    ys = list(range(len(points)))[::-1]
    labels = [str(p["label"]) for p in points]
    fig = new_figure(9.0, 0.55 * len(points) + 1.6)
    ax_auc, ax_mem = fig.subplots(1, 2, sharey=True)
    for ax, key, color, xlabel, fmt in (
        (ax_auc, "avg_auc", "#55a868", "Average test AUC (×100)", "{:.2f}"),
        (ax_mem, "mem_mb", "#c44e52", mem_label or "Peak training memory (MiB)", "{:,.0f}"),
    ):
        values = [p.get(key) if _finite(p.get(key)) else None for p in points]
        ax.barh(ys, [v or 0.0 for v in values], color=color, height=0.6)
        finite = [v for v in values if v is not None]
        upper = max(finite) if finite else 1.0
        lower = min(finite) if finite else 0.0
        if key == "avg_auc" and finite:
            ax.set_xlim(max(0.0, lower - (upper - lower) * 0.6 - 1.0), upper + (upper - lower) * 0.35 + 1.0)
        else:
            ax.set_xlim(0, upper * 1.3)
        for y, v in zip(ys, values, strict=True):
            x0 = ax.get_xlim()[0]
            ax.annotate(
                "—" if v is None else fmt.format(v),
                (max(v or x0, x0), y),
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=8,
            )
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="x", alpha=0.3)
    ax_auc.set_yticks(ys, labels)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, stem)


def figure_prompt_attention(per_method: Mapping[str, Sequence[float]], stem: str | Path, title: str = "") -> list[Path]:
    """Figure 6: mean attention that side tokens pay to the fine-grained prompts, per layer (1-based)."""
    series = {k: np.asarray(v, dtype=float) for k, v in per_method.items() if len(v)}
    if not series:
        raise ValueError("Figure 6 needs per-layer attention values for at least one method")
    layers = max(len(v) for v in series.values())
    width = 0.8 / len(series)
    fig = new_figure(max(6.0, 0.45 * layers + 3.0), 3.8)
    ax = fig.add_subplot()
    for i, (name, values) in enumerate(series.items()):
        xs = np.arange(1, len(values) + 1) + (i - (len(series) - 1) / 2) * width
        ax.bar(xs, values, width=width, label=name, color=PALETTE[i % len(PALETTE)])
    ax.set_xticks(np.arange(1, layers + 1))
    ax.set_xlabel("Side-network layer (1 = lowest)")
    ax.set_ylabel("Mean attention on prompts (fraction)")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(fontsize=8, frameon=False, loc="outside right upper")
    ax.set_title(title or "Average attention score on the fine-grained prompts per layer", fontsize=10)
    return save_figure(fig, stem)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """An image as [H, W, 3], uint8 or float clipped to [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.dtype != np.uint8:
        image = np.clip(image, 0.0, 1.0)
    return image


RANDOM_INIT = "random-init"


def background_note(fraction: float, weights: str = "") -> str:
    """The warning drawn on Figure 9 when most selected tokens lie on the background ("" otherwise)."""
    if not math.isfinite(fraction) or fraction >= 0.5:
        return ""
    note = f"Note: most selected tokens lie on the background ({100 * (1 - fraction):.0f}%)"
    if weights == RANDOM_INIT:
        return note + " — with a random-init LPM the importance scores carry no meaning."
    return note + " — the importance scores do not pick out the image content here."


def figure9_heading(method: str = "", run_id: str = "", weights: str = "") -> str:
    """Figure 9's title: "FPT+ · run fpt_plus-abc123 · weights random-init" (the parts that are known)."""
    parts = [method, f"run {run_id}" if run_id else "", f"weights {weights}" if weights else ""]
    return " · ".join(p for p in parts if p)


def _sample_grid(sample: Mapping[str, Any], image: np.ndarray) -> tuple[int, int, int]:
    """(patch size, grid rows, grid columns) of a Figure 9 sample."""
    patch = int(sample["patch_size"])
    return patch, image.shape[0] // patch, image.shape[1] // patch


def _sample_heat(sample: Mapping[str, Any], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(selected patch numbers, [rows, cols] attention summed per patch with NaN where none was selected)."""
    prefix = int(sample.get("num_prefix_tokens", 1))
    idx = np.asarray(sample["token_indices"]).astype(int).ravel()
    att = np.asarray(sample["token_attention"], dtype=float).ravel()
    keep = (idx >= prefix) & (idx - prefix < rows * cols)
    patches, weights = idx[keep] - prefix, att[keep]
    heat = np.full((rows, cols), np.nan)
    for p, w in zip(patches, weights, strict=True):
        row, col = divmod(int(p), cols)
        heat[row, col] = w if np.isnan(heat[row, col]) else heat[row, col] + w
    return patches, heat


def draw_token_attention(
    samples: Sequence[Mapping[str, Any]],
    title: str = "",
    method: str = "",
    run_id: str = "",
    weights: str = "",
) -> tuple[Figure, float]:
    """Figure 9 on a new Figure (see `figure_token_attention`); also returns the foreground fraction."""
    if not samples:
        raise ValueError("Figure 9 needs at least one image")
    images = [_as_rgb(s["image"]) for s in samples]
    grids = [_sample_grid(s, image) for s, image in zip(samples, images, strict=True)]
    on, total = np.zeros(len(samples), dtype=np.int64), np.zeros(len(samples), dtype=np.int64)
    for k, (sample, image, (_, rows, cols)) in enumerate(zip(samples, images, grids, strict=True)):
        chosen = sample.get("selected_indices")
        chosen = np.asarray(sample["token_indices"] if chosen is None else chosen)
        counts = foreground_counts(image[None], chosen[None], (rows, cols), int(sample.get("num_prefix_tokens", 1)))
        on[k], total[k] = counts[0][0], counts[1][0]
    fractions = [float(o / t) if t else math.nan for o, t in zip(on, total, strict=True)]
    overall = float(on.sum() / total.sum()) if total.sum() else math.nan
    every_layer = all(s.get("selected_indices") is not None for s in samples)
    heats = [_sample_heat(s, rows, cols) for s, (_, rows, cols) in zip(samples, grids, strict=True)]
    finite = [h[np.isfinite(h)] for _, h in heats]
    top = max((float(v.max()) for v in finite if v.size), default=1.0)
    norm = Normalize(vmin=0.0, vmax=top if top > 0 else 1.0)  # one colour scale for every image
    fig = new_figure(6.8, 3.0 * len(samples) + 1.2)
    axes = fig.subplots(len(samples), 2, squeeze=False)
    for (ax_box, ax_att), sample, image, (patch, rows, cols), (patches, heat), fraction in zip(
        axes, samples, images, grids, heats, fractions, strict=True
    ):
        mask = foreground_patches(image, (rows, cols))
        for p in patches:
            row, col = divmod(int(p), cols)
            on_fg = bool(mask[row, col])
            corner = (col * patch - 0.5, row * patch - 0.5)
            ax_box.add_patch(
                Rectangle(
                    corner,
                    patch,
                    patch,
                    fill=False,
                    edgecolor="lime" if on_fg else "magenta",
                    linestyle="-" if on_fg else "--",  # symbols, not only colour
                    linewidth=1.2,
                )
            )
            # a thin outline: low attention (near black) stays visible on a black background
            ax_att.add_patch(Rectangle(corner, patch, patch, fill=False, edgecolor="white", linewidth=0.4, zorder=3))
        ax_box.imshow(image)
        where = "all layers/heads" if sample.get("selected_indices") is not None else "shown head"
        share = f"{100 * fraction:.0f}% on the foreground ({where})" if math.isfinite(fraction) else "none on the image"
        ax_box.set_title(f"{sample.get('title', '')} {len(patches)} tokens shown\n{share}".strip(), fontsize=8.5)
        ax_att.imshow(image)
        extent = (-0.5, cols * patch - 0.5, rows * patch - 0.5, -0.5)  # pixel-centre coordinates
        ax_att.imshow(heat, cmap="inferno", norm=norm, alpha=0.65, extent=extent, interpolation="nearest")
        ax_att.set_xlim(-0.5, image.shape[1] - 0.5)
        ax_att.set_ylim(image.shape[0] - 0.5, -0.5)
        ax_att.set_title("attention of the prompts", fontsize=8.5)
        for ax in (ax_box, ax_att):
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(
        ScalarMappable(norm=norm, cmap="inferno"),
        ax=list(axes[:, 1]),
        fraction=0.05,
        pad=0.03,
        aspect=20 * len(samples),  # as long as the column of images
        label="prompt attention (one scale for all images)",
    )
    scope = "over every layer and head" if every_layer else "shown layer and head"
    share_line = (
        f"{100 * overall:.0f}% of selected tokens on the foreground ({scope})\n"
        "boxes: solid = foreground patch, dashed = background patch"
        if math.isfinite(overall)
        else "no selected patch tokens"
    )
    heading = figure9_heading(method, run_id, weights)
    fig.suptitle("\n".join(t for t in (heading, title, share_line) if t), fontsize=10)
    note = background_note(overall, weights)
    if note:
        fig.supxlabel(
            textwrap.fill(note, 84),
            fontsize=9,
            color="#8b0000",
            bbox={"boxstyle": "round,pad=0.4", "facecolor": "#fff3cd", "edgecolor": "#8b0000"},
        )
    return fig, overall


def figure_token_attention(
    samples: Sequence[Mapping[str, Any]],
    stem: str | Path,
    title: str = "",
    method: str = "",
    run_id: str = "",
    weights: str = "",
) -> list[Path]:
    """Figure 9: per image, the selected important tokens as boxes (left) and the prompts' attention on them.

    Each sample: image [H, W, 3] (un-normalised), token_indices [n] (sequence indices, class token = 0 skipped),
    token_attention [n], patch_size, optional num_prefix_tokens (default 1), title, and selected_indices [L, H, n]
    (every layer and head; the foreground fraction counts over them, else over token_indices). One colour scale
    and colorbar for all images; the heading names method, run and weights; the subtitle gives the share of
    selected tokens on the foreground (`introspection.foreground_fraction`), with a note when under half.
    """
    fig, _ = draw_token_attention(samples, title, method, run_id, weights)
    return save_figure(fig, stem)
