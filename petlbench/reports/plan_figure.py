"""The planner's figure and files: methods x resolutions coloured by predicted memory, the budget drawn."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from petlbench.core.atomic import write_json_atomic, write_text_atomic
from petlbench.profiling.memory_estimate import MIB
from petlbench.profiling.planner import MethodPlan, plan_markdown, plan_stem, predicted_grid, size_text
from petlbench.reports.figures import new_figure, save_figure


def figure_plan(plans: Sequence[MethodPlan], stem: str | Path) -> list[Path]:
    """Methods x resolutions, each cell coloured by predicted memory at the plan's batch size; cells over budget
    hatched, the budget boundary drawn, each method's largest feasible resolution marked. Writes PNG and PDF."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    rows = [p for p in plans if p.res_plan is not None and not p.error]
    if not rows:
        return []
    first = rows[0]
    patch = first.patch
    answers = [p.max_res for p in rows if p.max_res is not None]
    limit = max((p.res_plan.limit for p in rows if p.res_plan is not None), default=first.res)
    top = max([*answers, first.res])
    top = min(max(top + 4 * patch, int(top * 1.25)), limit)
    step = patch * max(1, math.ceil(top / patch / 48))
    columns = sorted({*range(step, top + 1, step), *answers})
    grid = np.vstack([predicted_grid(p, columns) for p in rows]) if rows else np.zeros((0, len(columns)))
    budget_mb = first.budget_bytes / MIB
    fig = new_figure(max(7.0, 0.16 * len(columns) + 3), 0.45 * len(rows) + 2.2)
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[np.isfinite(grid) & (grid > 0)]
    # colours saturate at 4x the budget: far extrapolations would otherwise flatten the interesting range
    low, high = (float(finite.min()), min(float(finite.max()), 4 * budget_mb)) if finite.size else (1.0, 1.0)
    norm = LogNorm(vmin=low, vmax=max(high, low * 1.01)) if finite.size else None
    mesh = ax.pcolormesh(
        np.arange(len(columns) + 1) - 0.5,
        np.arange(len(rows) + 1) - 0.5,
        np.ma.masked_invalid(grid),
        cmap="viridis",
        norm=norm,
        shading="flat",
    )
    for y, p in enumerate(rows):
        over = [x for x, r in enumerate(columns) if p.max_res is None or r > p.max_res]
        if over:
            start = over[0]
            ax.add_patch(
                Rectangle(
                    (start - 0.5, y - 0.5), len(columns) - start, 1, fill=False, hatch="///", edgecolor="white", lw=0
                )
            )
            ax.plot([start - 0.5, start - 0.5], [y - 0.5, y + 0.5], color="red", lw=2)
        if p.max_res is not None:
            x = columns.index(p.max_res)
            ax.plot(x, y, marker="*", color="red", markersize=11, markeredgecolor="black")
    ticks = [x for x, r in enumerate(columns) if r % (step * max(1, len(columns) // 12)) == 0 or r in answers]
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(columns[x]) for x in ticks], rotation=90, fontsize=7)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([p.name for p in rows])
    ax.invert_yaxis()  # methods top to bottom in table order
    ax.set_xlabel(f"input resolution (px, multiples of the {patch}-px patch)")
    ax.set_title(
        f"{first.backbone}, batch {first.batch_size}: predicted {first.memory_kind} memory vs the "
        f"{size_text(first.budget_bytes)} budget\n(hatched / right of the red line: over budget; "
        "star: largest feasible resolution, exact)",
        fontsize=9,
    )
    bar = fig.colorbar(mesh, ax=ax, extend="max")
    bar.set_label(f"predicted {first.memory_kind} memory (MiB)")
    if norm is not None and low <= budget_mb <= high:
        bar.ax.axhline(budget_mb, color="red", lw=2)
    return save_figure(fig, stem)


def write_plan(plans: Sequence[MethodPlan], out_dir: str | Path) -> list[Path]:
    """Write `<stem>.md`, `<stem>.json`, `<stem>.png` and `<stem>.pdf` under `out_dir`; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / plan_stem(plans)
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    write_text_atomic(md, plan_markdown(plans))
    write_json_atomic(js, [p.to_dict() for p in plans])
    return [md, js, *figure_plan(plans, stem)]
