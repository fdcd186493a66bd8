"""`petlbench report` (tables and figures from stored runs) and `petlbench plot memory` (Figure 2 from the
memory estimator alone)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

plot_app = typer.Typer(help="Draw single figures without a full report.", no_args_is_help=True)

GPU_MEM_HELP = "GPU memory budget drawn/used as the out-of-memory limit, e.g. 48GB (the papers' RTX A6000), 80GB."


def report(
    results: Annotated[Path, typer.Option(help="Results folder.")] = Path("results"),
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("reports"),
    gpu_mem: Annotated[str, typer.Option(help=GPU_MEM_HELP)] = "48GB",
    backbone: Annotated[str | None, typer.Option(help="Backbone of the main tables (default: most common).")] = None,
    res: Annotated[int | None, typer.Option(help="Input resolution of the main tables (default: most common).")] = None,
    table3_backbone: Annotated[
        str | None, typer.Option(help="Backbone of Table III (default: the one run at most resolutions).")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset of Table II (default: most common).")] = None,
    filters: Annotated[
        list[str] | None,
        typer.Option(
            "--filter",
            help="Fix part of the main setting, key=value (repeatable); keys: backbone, res, batch_size, epochs, "
            "weights, dataset (its name, or its column label with the fingerprint suffix when two contents share a "
            "name). The rest is the most common complete setting among the matching runs.",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(help="'paper': Params as the FPT authors' code counts them (official convention)."),
    ] = None,
) -> None:
    """Build the papers' tables (Markdown, LaTeX, CSV) and figures (PNG, PDF) from stored runs, plus index.md."""
    from petlbench.cli.common import console, fail
    from petlbench.core.config import ConfigError
    from petlbench.core.preset import get_preset
    from petlbench.reports import build_report

    try:
        convention = get_preset(preset).param_convention
    except ConfigError as err:
        fail(str(err))

    def warn(message: str) -> None:
        """Print a report warning (the message's brackets are text, not markup)."""
        from rich.markup import escape

        console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False)

    try:
        index = build_report(
            results,
            out,
            gpu_mem=gpu_mem,
            backbone=backbone,
            res=res,
            table3_backbone=table3_backbone,
            dataset=dataset,
            filters=filters or None,
            log=warn,
            param_convention=convention,
        )
    except ValueError as err:
        fail(str(err))
    console.print(f"report written: [bold]{index}[/bold]")


@plot_app.command("memory")
def plot_memory(
    methods: Annotated[str, typer.Option(help="'all' or comma-separated method keys.")] = "all",
    backbone: Annotated[str, typer.Option(help="timm ViT name.")] = "vit_large_patch16_224",
    res: Annotated[str, typer.Option(help="Comma-separated input resolutions.")] = "128,256,384,512,640,1024,2048",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 16,
    gpu_mem: Annotated[str, typer.Option(help=GPU_MEM_HELP)] = "48GB",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("reports"),
) -> None:
    """Figure 2 from the memory estimator: training memory against resolution per method (no GPU needed)."""
    from petlbench.cli.common import console, fail, progress_log, user_errors
    from petlbench.core.method import parse_method_keys
    from petlbench.reports.build import memory_estimate_figure, parse_gpu_mem

    try:
        resolutions = [int(r) for r in res.split(",") if r.strip()]
        parse_gpu_mem(gpu_mem)
    except ValueError as err:
        fail(f"{err}" if "GPU" in str(err) else f"--res {res!r} must be comma-separated integers")
    if not resolutions or batch_size < 1:
        fail("give at least one resolution and a batch size >= 1")
    try:
        import petlbench.profiling as profiling

        if not hasattr(profiling, "memory_sweep"):
            raise ImportError("petlbench.profiling has no memory_sweep")
    except ImportError as err:
        fail(f"the memory estimator is not available in this install ({err})")
    started = time.perf_counter()
    try:
        keys = parse_method_keys(methods)
        paths = memory_estimate_figure(keys, backbone, resolutions, batch_size, gpu_mem, out, log=progress_log())
    except user_errors() as err:
        fail(str(err))
    console.print(
        f"memory figure written: [bold]{paths[0]}[/bold] (+ .pdf, .csv) in {time.perf_counter() - started:.1f}s"
    )


def register(app: typer.Typer) -> None:
    """Add `report` and the `plot` group to the CLI."""
    app.command("report")(report)
    app.add_typer(plot_app, name="plot")
