"""`petlbench plan --gpu-mem 24GB`: per method, the largest resolution and batch size whose estimated training memory
fits a GPU, with the memory kind compared and the throughput (or FLOPs) there. Thin wrapper around
`petlbench.profiling.planner`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from petlbench.cli.common import JOBS_HELP, OPT_HELP

ATTENTION_HELP = "Attention implementation: auto (as the model is built), fused (SDPA) or explicit (softmax map)."


def plan(
    gpu_mem: Annotated[str, typer.Option(help="GPU memory budget, e.g. 24GB or 80GiB (GB = GiB = 2^30 bytes).")],
    backbone: Annotated[str, typer.Option(help="timm ViT name.")] = "vit_base_patch16_224",
    methods: Annotated[str, typer.Option(help="'all' or comma-separated method keys.")] = "all",
    batch_size: Annotated[int, typer.Option(help="Batch size at which the largest resolution is found.")] = 16,
    res: Annotated[
        int | None,
        typer.Option(
            help="Resolution (px) at which the largest batch size is found [default: 512, or the nearest "
            "multiple of the patch size]."
        ),
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            help="GPU name as torch reports it (e.g. 'NVIDIA H200'): device memory where its CUDA context is "
            "measured, throughput where results/reference has a measurement for it."
        ),
    ] = None,
    max_res: Annotated[int, typer.Option(help="Largest resolution searched (px).")] = 8192,
    max_batch: Annotated[int, typer.Option(help="Largest batch size searched.")] = 8192,
    jobs: Annotated[int, typer.Option(help=JOBS_HELP)] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per method.")] = False,
    out: Annotated[Path, typer.Option(help="Folder for the Markdown, JSON and figure (PNG + PDF).")] = Path("reports"),
    reference: Annotated[Path, typer.Option(help="Folder of measured references (petlbench validate JSON).")] = Path(
        "results/reference"
    ),
    num_classes: Annotated[int, typer.Option(help="Number of classes of the head.")] = 5,
    attention: Annotated[str, typer.Option(help=ATTENTION_HELP)] = "auto",
    opt: Annotated[list[str] | None, typer.Option("--opt", help=OPT_HELP)] = None,
) -> None:
    """Largest resolution (at --batch-size) and batch size (at --res) per method that fit --gpu-mem (no GPU
    needed): exact estimates, found through a fitted memory model and confirmed one step past the answer."""
    from petlbench.cli.common import check_attention, console, err_console, fail, progress_log, user_errors
    from petlbench.core.method import BackboneSpec
    from petlbench.core.options import parse_opt_flags
    from petlbench.profiling.planner import plan_markdown, plan_methods
    from petlbench.profiling.profile import _json_default, parse_mem
    from petlbench.profiling.workers import auto_workers
    from petlbench.reports.plan_figure import write_plan

    try:
        budget = parse_mem(gpu_mem)
    except ValueError as err:
        fail(str(err))
    if budget is None or budget <= 0 or batch_size < 1 or (res is not None and res < 1) or max_res < 1 or max_batch < 1:
        fail("--gpu-mem, --batch-size, --res, --max-res and --max-batch must be positive")
    try:
        workers = auto_workers(jobs)
    except ValueError as err:
        fail(str(err))
    check_attention(attention)
    started = time.perf_counter()
    errors: tuple[type[BaseException], ...] = (*user_errors(), ValueError)
    try:
        plans = plan_methods(
            methods,
            BackboneSpec(backbone),
            budget,
            batch_size=batch_size,
            res=res,
            num_classes=num_classes,
            attention=attention,
            gpu=gpu,
            options=parse_opt_flags(opt),
            max_res=max_res,
            max_batch=max_batch,
            reference_dir=reference,
            jobs=workers,
            log=progress_log(),
        )
    except errors as err:
        fail(str(err))
    paths = write_plan(plans, out)
    seconds = time.perf_counter() - started
    written = f"plan written: {', '.join(str(p) for p in paths)} ({seconds:.1f}s)"
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in plans], indent=2, default=_json_default))
        err_console.print(written, markup=False, soft_wrap=True)
        return
    console.print(plan_markdown(plans), markup=False, soft_wrap=True)
    console.print(written, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `plan` to the CLI."""
    app.command("plan")(plan)
