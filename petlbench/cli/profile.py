"""`petlbench profile` (per-method efficiency), `petlbench memory` (estimated memory vs resolution) and
`petlbench bench` (the `make bench` efficiency comparison on this CPU). Thin wrappers around
`petlbench.profiling`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from petlbench.cli.common import JOBS_HELP, JSON_HELP, OPT_HELP

ATTENTION_HELP = "Attention implementation: auto (as the model is built), fused (SDPA) or explicit (softmax map)."


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


PRESET_HELP = "Conventions for every knob not given: 'paper' = the FPT+ papers' (see `petlbench run --help`)."


def _preset_setup(
    preset: str | None, methods: str, backbone: str | None, default_backbone: str, attention: str, opt: list[str] | None
) -> tuple[Any, str, dict[str, dict[str, Any]]]:
    """(BackboneSpec, attention, options per method) with the preset's values for everything not given."""
    from petlbench.core.method import BackboneSpec, get_method, parse_method_keys
    from petlbench.core.options import parse_opt_flags
    from petlbench.core.preset import backbone_name, get_preset, method_overrides

    chosen = get_preset(preset)
    given = parse_opt_flags(opt)
    options = {
        key: method_overrides(chosen, get_method(key), dict(given.get(key, {}))) for key in parse_method_keys(methods)
    }
    if attention == "auto" and chosen.attention is not None:
        attention = chosen.attention
    name = backbone_name(chosen, backbone, pretrained=False, fallback=default_backbone)
    return BackboneSpec(name, pos_interp=chosen.pos_interp or "timm"), attention, {**given, **options}


def _print_json(rows: Any) -> None:
    from petlbench.profiling.profile import _json_default

    typer.echo(json.dumps(rows, indent=2, default=_json_default))


def profile(
    methods: Annotated[str, typer.Option(help="'all' or comma-separated method keys.")] = "all",
    backbone: Annotated[str | None, typer.Option(help="timm ViT name (default vit_base_patch16_224).")] = None,
    res: Annotated[int, typer.Option(help="Input resolution (px).")] = 512,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 16,
    measure: Annotated[bool, typer.Option("--measure", help="Also time a few real training steps here.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    num_classes: Annotated[int, typer.Option(help="Number of classes of the head.")] = 5,
    attention: Annotated[str, typer.Option(help=ATTENTION_HELP)] = "auto",
    device: Annotated[str, typer.Option(help="Device for --measure: auto, cpu, cuda, cuda:1.")] = "auto",
    opt: Annotated[list[str] | None, typer.Option("--opt", help=OPT_HELP)] = None,
    preset: Annotated[str | None, typer.Option(help=PRESET_HELP)] = None,
) -> None:
    """Parameters, FLOPs (attention counted), estimated peak training memory and, with --measure, measured
    memory, throughput and power of each method."""
    from petlbench.cli.common import check_attention, console, fail, progress_log, user_errors
    from petlbench.profiling import FLOPS_UNIT, profile_methods

    if batch_size < 1 or res < 1:
        fail("--res and --batch-size must be positive")
    check_attention(attention)
    started = time.perf_counter()
    try:
        spec, attention, options = _preset_setup(preset, methods, backbone, "vit_base_patch16_224", attention, opt)
        rows = profile_methods(
            methods,
            spec,
            res,
            batch_size,
            num_classes=num_classes,
            measure=measure,
            device=device,
            attention=attention,
            options=options,
            log=progress_log(),
        )
    except user_errors() as err:
        fail(str(err))
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"{backbone} at {res} px, batch {batch_size} ({time.perf_counter() - started:.1f}s)")
    columns = ["Method", "Trainable", "Ratio %", "Attention", "Fwd GFLOPs", "Train-step GFLOPs", "Est. peak MiB"]
    if measure:
        columns += ["Peak alloc MiB", "Peak reserved MiB", "NVML MiB", "img/s", "Power avg W", "Energy J"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("Method", "Attention") else "right")
    for r in rows:
        cells = [
            r["name"],
            f"{r['trainable']:,}",
            _fmt(r["ratio_pct"], 4),
            r["attention"],
            _fmt(r["fwd_gflops"], 2),
            _fmt(r["train_step_gflops"], 2),
            _fmt(r["est_peak_mem_mb"]),
        ]
        if measure:
            power = r.get("power") or {}
            cells += [
                _fmt(r.get("measured_peak_allocated_mb")),
                _fmt(r.get("measured_peak_reserved_mb")),
                _fmt(r.get("nvml_process_mem_mb")),
                _fmt(r.get("train_images_per_s"), 2),
                _fmt(power.get("power_avg_w")),
                _fmt(power.get("energy_j")),
            ]
        table.add_row(*cells)
    console.print(table)
    console.print(
        f"FLOPs: {FLOPS_UNIT}. Est. peak: data-less (meta/fake tensor) replay of one steady-state step "
        "(CUDA target, tensors only: no CUDA context or workspaces), MiB."
    )
    notes = [r for r in rows if r.get("preload_gflops_per_image") is not None]
    for r in notes:
        console.print(
            f"{r['name']}: preloaded features; one-off preload cost {_fmt(r['preload_gflops_per_image'], 2)} "
            f"GFLOPs/image; without preloading {_fmt(r.get('train_step_gflops_no_preload'), 2)} GFLOPs per "
            f"train step and {_fmt(r.get('est_peak_mem_mb_no_preload'))} MiB."
        )
    if measure and rows and (rows[0].get("power") or {}).get("reason"):
        console.print(f"power: n/a ({rows[0]['power']['reason']})")


def memory(
    methods: Annotated[str, typer.Option(help="'all' or comma-separated method keys.")] = "all",
    backbone: Annotated[str | None, typer.Option(help="timm ViT name (default vit_large_patch16_224).")] = None,
    res: Annotated[str, typer.Option(help="Comma-separated resolutions.")] = "128,256,384,512,640,1024,2048",
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 16,
    gpu_mem: Annotated[str | None, typer.Option(help="GPU memory budget, e.g. 48GB (GB = GiB).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
    num_classes: Annotated[int, typer.Option(help="Number of classes of the head.")] = 5,
    attention: Annotated[str, typer.Option(help=ATTENTION_HELP)] = "auto",
    opt: Annotated[list[str] | None, typer.Option("--opt", help=OPT_HELP)] = None,
    preset: Annotated[str | None, typer.Option(help=PRESET_HELP)] = None,
    jobs: Annotated[int, typer.Option(help=JOBS_HELP)] = 0,
) -> None:
    """Estimated peak training memory of each method at each resolution (no GPU needed)."""
    from petlbench.cli.common import check_attention, console, fail, progress_log, user_errors
    from petlbench.profiling import memory_sweep, parse_mem
    from petlbench.profiling.workers import auto_workers

    try:
        resolutions = [int(r) for r in res.split(",") if r.strip()]
    except ValueError:
        fail(f"--res {res!r} must be comma-separated integers")
    try:
        budget = parse_mem(gpu_mem)
    except ValueError as err:
        fail(str(err))
    if not resolutions or batch_size < 1:
        fail("give at least one resolution and a batch size >= 1")
    check_attention(attention)
    started = time.perf_counter()
    try:
        spec, attention, options = _preset_setup(preset, methods, backbone, "vit_large_patch16_224", attention, opt)
        rows = memory_sweep(
            methods,
            spec,
            resolutions,
            batch_size,
            gpu_mem_bytes=budget,
            num_classes=num_classes,
            attention=attention,
            options=options,
            log=progress_log(),
            jobs=auto_workers(jobs),
        )
    except user_errors() + (ValueError,) as err:
        fail(str(err))
    if as_json:
        _print_json(rows)
        return
    from rich.table import Table

    table = Table(
        title=f"Estimated peak training memory (MiB): {spec.name}, batch {batch_size} "
        f"({time.perf_counter() - started:.1f}s)"
    )
    table.add_column("Method")
    for r in resolutions:
        table.add_column(f"{r} px", justify="right")
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_method.setdefault(row["method"], {})[row["res"]] = row
    for key, cells in by_method.items():
        values = []
        for r in resolutions:
            row = cells[r]
            text = _fmt(row["est_peak_mem_mb"], 0) if row["est_peak_mem_mb"] is not None else "error"
            values.append(f"[red]{text} ✗[/red]" if row.get("exceeds_budget") else text)
        table.add_row(key, *values)
    console.print(table)
    if budget is not None:
        kinds = sorted({str(r.get("budget_memory_kind")) for r in rows if r.get("budget_memory_kind")})
        console.print(
            f"values: allocated memory (MiB); ✗ (red): above the {budget / 2**30:g} GiB budget, compared with "
            f"{' / '.join(kinds) or 'allocated'} memory (device when a CUDA context is measured, else reserved)",
            soft_wrap=True,
        )
    for row in rows:
        if row.get("error"):
            console.print(f"{row['method']} @ {row['res']} px: {row['error']}", markup=False)


def bench(
    methods: Annotated[str, typer.Option(help="'all' or comma-separated method keys.")] = "all",
    backbone: Annotated[str, typer.Option(help="timm ViT name (small: CPU minutes).")] = "vit_tiny_patch16_224",
    res: Annotated[int, typer.Option(help="Input resolution (px).")] = 224,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 8,
    steps: Annotated[int, typer.Option(help="Timed training steps per method.")] = 3,
    warmup: Annotated[int, typer.Option(help="Warm-up steps per method (not timed).")] = 1,
    out: Annotated[Path, typer.Option(help="Output folder (bench.md: the table, bench.json: rows).")] = Path("reports"),
    opt: Annotated[list[str] | None, typer.Option("--opt", help=OPT_HELP)] = None,
) -> None:
    """Efficiency of every method relative to full fine-tuning, measured on this machine's CPU."""
    from petlbench.cli.common import console, fail, plain_log, user_errors
    from petlbench.core.atomic import FolderError, check_writable_folder
    from petlbench.core.method import BackboneSpec
    from petlbench.core.options import parse_opt_flags
    from petlbench.profiling import run_bench

    try:
        check_writable_folder(out, "output folder")
    except FolderError as err:
        fail(f"{err}: choose another with --out")
    log = plain_log(console)  # the Markdown as written: never wrapped or cut, whatever the terminal's width
    started = time.perf_counter()
    try:
        report = run_bench(
            methods,
            BackboneSpec(backbone),
            res=res,
            batch_size=batch_size,
            steps=steps,
            warmup=warmup,
            out=out,
            options=parse_opt_flags(opt),
            log=log,
        )
    except user_errors() as err:
        fail(str(err))
    log(Path(report["paths"][0]).read_text())
    log(f"bench written: {report['paths'][0]}, {report['paths'][1]} ({time.perf_counter() - started:.0f}s)")


def register(app: typer.Typer) -> None:
    """Add `profile`, `memory` and `bench` to the CLI."""
    app.command("profile")(profile)
    app.command("memory")(memory)
    app.command("bench")(bench)
