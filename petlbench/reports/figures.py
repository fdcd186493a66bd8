"""The papers' figures, drawn from plain data (lists of dicts, arrays) with matplotlib's Agg canvas.

No pyplot and no global backend switch: every function builds a `Figure`, writes `<stem>.png` and
`<stem>.pdf`, and returns both paths. Inputs are plain Python/NumPy so tests can pass fixture values and
`petlbench plot memory` can pass the estimator's rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

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
    """A stable colour per method: registry position when known, else next free palette slot."""
    colors: dict[str, str] = {}
    for key in keys:
        if key in order:
            colors[key] = PALETTE[list(order).index(key) % len(PALETTE)]
    spare = iter(c for c in PALETTE * 3 if c not in colors.values())
    for key in keys:
        colors.setdefault(key, next(spare, "#333333"))
    return colors


def _finite(value: Any) -> bool:
    """True for a finite int or float."""
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def figure_auc_vs_params(
    points: Sequence[Mapping[str, Any]], stem: str | Path, title: str = "", order: Sequence[str] = ()
) -> list[Path]:
    """Figure 1: average AUC against trainable-parameter ratio (log x), dot area ∝ memory, colour per method.

    Each point: method (key), label, ratio_pct, avg_auc, mem_mb (None: drawn as a hollow dot of fixed size).
    """
    usable = [p for p in points if _finite(p.get("ratio_pct")) and _finite(p.get("avg_auc"))]
    if not usable:
        raise ValueError("Figure 1 needs at least one method with both a parameter ratio and an average AUC")
    colors = method_colors([p["method"] for p in usable], order)
    mems = [p["mem_mb"] for p in usable if _finite(p.get("mem_mb")) and p["mem_mb"] > 0]
    top = max(mems) if mems else 1.0
    max_area = 1400.0

    def area(mem: float) -> float:
        """Marker area (pt²) proportional to memory, with a visible minimum."""
        return max(max_area * mem / top, 12.0)

    fig = new_figure(8.2, 4.8)
    ax = fig.add_subplot()
    handles = []
    for p in usable:
        color = colors[p["method"]]
        if _finite(p.get("mem_mb")) and p["mem_mb"] > 0:
            ax.scatter(
                p["ratio_pct"],
                p["avg_auc"],
                s=area(p["mem_mb"]),
                color=color,
                alpha=0.6,
                edgecolors="black",
                linewidths=0.6,
                zorder=3,
            )
        else:
            ax.scatter(
                p["ratio_pct"], p["avg_auc"], s=60, facecolors="none", edgecolors=color, linewidths=1.5, zorder=3
            )
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                linestyle="",
                markersize=8,
                markerfacecolor=color,
                markeredgecolor="black",
                alpha=0.8,
                label=p.get("label", p["method"]),
            )
        )
    ax.set_xscale("log")
    if max(p["ratio_pct"] for p in usable) / min(p["ratio_pct"] for p in usable) < 100:
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # label 2 and 5 on short ranges
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.set_xlabel("Trainable parameters (% of total, log scale)")
    ax.set_ylabel("Average test AUC (×100)")
    ax.grid(True, which="both", alpha=0.3)
    ratios = [p["ratio_pct"] for p in usable]
    aucs = [p["avg_auc"] for p in usable]
    ax.set_xlim(min(ratios) / 3, min(max(ratios) * 3, 200.0))  # ratios never exceed 100 %
    span = max(aucs) - min(aucs)
    pad = max(span * 0.15, 0.5)
    ax.set_ylim(min(aucs) - pad, max(aucs) + pad)
    if any(not (_finite(p.get("mem_mb")) and p["mem_mb"] > 0) for p in usable):
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
    fig.legend(handles=handles, title="Method", loc="outside right upper", fontsize=8, title_fontsize=9, frameon=False)
    if mems:
        refs = sorted({_round_sig(top), _round_sig(top / 4), _round_sig(top / 16)})
        size_handles = [
            ax.scatter([], [], s=area(m), color="grey", alpha=0.5, edgecolors="black", label=f"{m:,.0f} MiB")
            for m in refs
            if m > 0
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
    return save_figure(fig, stem)


def _plain_number(value: float, _pos: int | None = None) -> str:
    """Tick label without scientific notation: 0.01, 0.1, 1, 10, 100."""
    return f"{value:,.10f}".rstrip("0").rstrip(".") if value < 1 else f"{value:,.0f}"


def _round_sig(value: float, digits: int = 1) -> float:
    """`value` rounded to `digits` significant digits."""
    if value <= 0:
        return 0.0
    return round(value, -int(math.floor(math.log10(value))) + digits - 1)


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
    memory without a figure: drawn as × on the GPU line). Values above the budget are drawn as they are.
    """
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
    fig = new_figure(8.2, 4.8)
    ax = fig.add_subplot()
    resolutions = sorted({r for pts in by_method.values() for r, _, _ in pts})
    for i, (method, pts) in enumerate(by_method.items()):
        pts.sort()
        xs = [r for r, m, _ in pts if m is not None]
        ys = [m / 1024.0 for _, m, _ in pts if m is not None]
        # markers and dashes vary too, so near-identical curves (LoRA/AdaLoRA) stay distinguishable
        ax.plot(
            xs,
            ys,
            marker=MARKERS[i % len(MARKERS)],
            markersize=5,
            linewidth=1.5,
            color=colors[method],
            linestyle=("-", "--", "-.", ":")[(i // 2) % 4],
            label=labels.get(method, method),
            alpha=0.9,
        )
        ooms = [r for r, m, oom in pts if m is None and oom]
        if ooms and gpu_mem_mb:
            ax.scatter(ooms, [gpu_mem_mb / 1024.0] * len(ooms), marker="x", s=60, color=colors[method], zorder=4)
    if gpu_mem_mb:
        ax.axhline(
            gpu_mem_mb / 1024.0,
            color="red",
            linewidth=1.8,
            linestyle="--",
            label=f"GPU memory\n({gpu_label or f'{gpu_mem_mb / 1024:.0f} GiB'})",
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
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    ax.set_title(title or "Training memory vs. input resolution", fontsize=10)
    return save_figure(fig, stem)


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


def figure_token_attention(samples: Sequence[Mapping[str, Any]], stem: str | Path, title: str = "") -> list[Path]:
    """Figure 9: per image, the selected important tokens as boxes (left) and the prompts' attention on them.

    Each sample: image [H, W, 3], token_indices [n] (sequence indices, class token = 0 skipped),
    token_attention [n], patch_size, optional num_prefix_tokens (default 1) and title.
    """
    if not samples:
        raise ValueError("Figure 9 needs at least one image")
    fig = new_figure(6.4, 3.1 * len(samples) + 0.4)
    axes = fig.subplots(len(samples), 2, squeeze=False)
    for (ax_box, ax_att), sample in zip(axes, samples, strict=True):
        image = _as_rgb(sample["image"])
        height, width = image.shape[:2]
        patch = int(sample["patch_size"])
        prefix = int(sample.get("num_prefix_tokens", 1))
        grid_w = width // patch
        idx = np.asarray(sample["token_indices"]).astype(int).ravel()
        att = np.asarray(sample["token_attention"], dtype=float).ravel()
        keep = idx >= prefix
        patches, weights = idx[keep] - prefix, att[keep]
        heat = np.full((height // patch, grid_w), np.nan)
        for p, w in zip(patches, weights, strict=True):
            row, col = divmod(int(p), grid_w)
            if row < heat.shape[0]:
                heat[row, col] = w if np.isnan(heat[row, col]) else heat[row, col] + w
                ax_box.add_patch(
                    Rectangle(
                        (col * patch - 0.5, row * patch - 0.5),
                        patch,
                        patch,
                        fill=False,
                        edgecolor="lime",
                        linewidth=1.2,
                    )
                )
        ax_box.imshow(image)
        ax_box.set_title(f"{sample.get('title', '')} selected tokens ({len(patches)})".strip(), fontsize=9)
        ax_att.imshow(image)
        extent = (-0.5, grid_w * patch - 0.5, heat.shape[0] * patch - 0.5, -0.5)  # pixel-centre coordinates
        shown = ax_att.imshow(heat, cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
        ax_att.set_xlim(-0.5, width - 0.5)
        ax_att.set_ylim(height - 0.5, -0.5)
        fig.colorbar(shown, ax=ax_att, fraction=0.046, pad=0.03, label="prompt attention")
        ax_att.set_title("attention of the prompts", fontsize=9)
        for ax in (ax_box, ax_att):
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, stem)
