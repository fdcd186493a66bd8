"""The root `petlbench` command: run, methods, params, datasets, preload; the other groups register here."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, TypedDict

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from petlbench.cli.common import (
    DEVICE_HELP,
    JSON_HELP,
    LOG_TO_HELP,
    OPT_HELP,
    PRETRAINED_HELP,
    WEIGHTS_HELP,
    check_amp,
    check_attention,
    check_log_to,
    console,
    err_console,
    fail,
    plain_log,
    size_flag,
    user_errors,
)

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Compare parameter-efficient transfer learning methods (FPT+, FPT, LoRA, ...) on high-resolution images.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=HELP_OPTIONS,
)
datasets_app = typer.Typer(help="Generate and check datasets.", no_args_is_help=True, context_settings=HELP_OPTIONS)
app.add_typer(datasets_app, name="datasets")


def _print_version(value: bool) -> None:
    if value:
        from petlbench import __version__

        console.print(f"petlbench {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """Compare parameter-efficient transfer learning methods (FPT+, FPT, LoRA, ...) on high-resolution images."""


RUN_EXIT_CODES = (
    "Exit status: 0 every run finished (now, or in an earlier invocation; runs another process is training are "
    "skipped); 1 a run failed or ran out of memory (the other runs still ran, and are stored); 2 bad input or an "
    "unusable results folder, found before any training."
)


@app.command(epilog=RUN_EXIT_CODES)
def run(
    methods: Annotated[
        str, typer.Option(help="'all' or comma-separated method keys (see `petlbench methods`).")
    ] = "all",
    dataset: Annotated[
        str | None, typer.Option(help="Image folder, CSV manifest or dataset card; default: embedded synthetic set.")
    ] = None,
    results: Annotated[Path, typer.Option(help="Results folder.")] = Path("results"),
    res: Annotated[
        str,
        typer.Option(
            help="Input resolution (FPT/FPT+: of the frozen large model), or 'auto': per method the largest that fits "
            "--gpu-mem at --batch-size (`petlbench plan`)."
        ),
    ] = "512",
    backbone: Annotated[
        str | None, typer.Option(help="timm ViT name; default vit_base_patch16_224 (tiny ViT on the embedded default).")
    ] = None,
    pretrained: Annotated[bool, typer.Option(help=PRETRAINED_HELP)] = False,
    weights: Annotated[str | None, typer.Option(help=WEIGHTS_HELP)] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs (default 20; 3 on the embedded default).")] = None,
    batch_size: Annotated[
        str | None,
        typer.Option(
            help="Batch size (default 16; 8 on the embedded default), or 'auto': per method the largest that fits "
            "--gpu-mem at --res."
        ),
    ] = None,
    gpu_mem: Annotated[
        str | None,
        typer.Option(help="GPU memory budget of 'auto' sizes, e.g. 24GB; default: the CUDA device's total memory."),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Base learning rate (default: dataset card's, else 1e-3).")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay (default 0.1).")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated training seeds, e.g. 0,1,2,3,4.")] = "0",
    opt: Annotated[list[str] | None, typer.Option(help=OPT_HELP)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    amp: Annotated[str, typer.Option(help="none or bf16 (autocast on CUDA, all methods alike).")] = "none",
    attention: Annotated[str, typer.Option(help="Attention kernel: auto, fused or explicit.")] = "auto",
    force: Annotated[bool, typer.Option(help="Redo runs that already finished.")] = False,
    skip_bad_images: Annotated[
        bool, typer.Option(help="Exclude unreadable images (recorded) instead of stopping.")
    ] = False,
    workers: Annotated[int, typer.Option(help="Data-loading worker processes.")] = 0,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Conventions for every knob not given: 'paper' = the FPT+ papers' (eager attention, the authors' "
            "position-table interpolation, their LPM vit_base_patch16_384.orig_in21k_ft_in1k with --pretrained, "
            "float32 feature caches, official parameter counts); recorded with every run."
        ),
    ] = None,
    pos_interp: Annotated[
        str | None,
        typer.Option(
            help="Position table at --res: 'timm' (resampled once at build) or 'official' (the authors' per-forward "
            "bicubic interpolation); default: the preset's, else timm."
        ),
    ] = None,
    allow_leakage: Annotated[
        bool,
        typer.Option(
            help="Train even if identical image files occur in more than one split; the files are recorded in the "
            "run record."
        ),
    ] = False,
    report: Annotated[bool, typer.Option(help="Refresh the report (reports/) at the end.")] = False,
    reports_dir: Annotated[Path, typer.Option("--reports", help="Report folder for --report.")] = Path("reports"),
    log_to: Annotated[str | None, typer.Option(help=LOG_TO_HELP)] = None,
) -> None:
    """Train and evaluate methods on one dataset with the papers' protocol; store and summarise results."""
    from petlbench.core.results import FAILED, OOM, ResultStore
    from petlbench.engine.callbacks import Callbacks, EpochLog, RunCallback
    from petlbench.engine.runner import RunRequest, check_results_folder, execute, format_mean_std, resolve, summarise
    from petlbench.engine.training import ProgressHooks
    from petlbench.profiling.planner import size_planner
    from petlbench.reports.callbacks import run_callbacks

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {seeds!r} must be comma-separated integers, e.g. 0,1,2")
    res_value, batch_value = size_flag("--res", res) or 512, size_flag("--batch-size", batch_size)
    amp_mode = check_amp(amp)
    attention_kernel = check_attention(attention)
    trackers = check_log_to(log_to)
    request = RunRequest(
        methods=methods,
        dataset=dataset,
        results=results,
        res=res_value,
        backbone=backbone,
        pretrained=pretrained,
        weights=weights,
        epochs=epochs,
        batch_size=batch_value,
        lr=lr,
        weight_decay=weight_decay,
        seeds=seed_list,
        opts=opt or [],
        device=device,
        amp=amp_mode,
        attention=attention_kernel,
        force=force,
        skip_bad_images=skip_bad_images,
        workers=workers,
        preset=preset,
        pos_interp=pos_interp,
        allow_leakage=allow_leakage,
    )
    try:
        check_results_folder(results)  # before resolve, which may write a generated split there
        resolved = resolve(request, log=plain_log(console), size_planner=size_planner(gpu_mem))
    except user_errors() as err:
        fail(str(err))
    except ValueError as err:
        fail(str(err))
    for note in resolved.notes:
        console.print(f"[yellow]note:[/yellow] {escape(note)}")
    first = resolved.configs[0][1]
    console.print(
        f"dataset [bold]{escape(resolved.source.name)}[/bold] ({resolved.source.num_classes} classes, split "
        f"{resolved.source.split_origin}, {len(resolved.source.samples)} images) · backbone {first.backbone} "
        f"({first.weights}) · {_sizes(resolved, 'res', 'px')} · {first.epochs} epochs · "
        f"{_sizes(resolved, 'batch_size', '', 'batch ')} · "
        f"lr {first.lr:g} · device {first.device} · {len(resolved.configs)} runs"
    )
    store = ResultStore(results, log=plain_log(err_console))

    def callbacks() -> RunCallback:
        return Callbacks([run_callbacks(log_to=trackers), EpochLog(plain_log(console))])

    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            runs_task = progress.add_task("runs", total=len(resolved.configs))
            epoch_task = progress.add_task("epoch", total=1, visible=False)
            batch_task = progress.add_task("batches", total=1, visible=False)

            def on_run(done: int, total: int, cfg: Any, status: str) -> None:
                description = f"runs · {cfg.method} seed {cfg.seed}: {status}"
                progress.update(runs_task, completed=done, description=escape(description))

            def on_epoch(epochs_done: int, epochs: int) -> None:
                progress.update(epoch_task, completed=epochs_done, total=epochs, visible=True, description="epoch")

            def on_batch(done: int, total: int, phase: str) -> None:
                progress.update(batch_task, completed=done, total=total, visible=True, description=phase)

            hooks = ProgressHooks(on_epoch=on_epoch, on_batch=on_batch, log=plain_log(progress.console))
            records = execute(resolved, store, force=force, hooks=hooks, on_run=on_run, callbacks=callbacks)
            progress.update(runs_task, completed=len(resolved.configs))
    else:  # redirected: one plain line per run and per epoch, written as they happen
        log = plain_log(console)

        def run_line(done: int, total: int, cfg: Any, status: str) -> None:
            if status != "running":
                log(f"run {done}/{total} · {cfg.method} seed {cfg.seed} ({cfg.run_id}): {status}")

        records = execute(
            resolved, store, force=force, hooks=ProgressHooks(log=log), on_run=run_line, callbacks=callbacks
        )
    table = Table(title=escape(f"Results ({results}/runs.jsonl)"))
    for column in ("method", "trainable params %", "val AUC", "test AUC", "runs"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in summarise(records):
        status = f"{row['finished']}/{row['runs']}" + (f" ({', '.join(row['statuses'])})" if row["statuses"] else "")
        ratio = "—" if not math.isfinite(row["ratio_pct"]) else f"{row['ratio_pct']:.4g}"
        (val_mean, val_std), (test_mean, test_std) = row["val_auc"], row["test_auc"]
        val, test = format_mean_std(val_mean, val_std, row["n"]), format_mean_std(test_mean, test_std, row["n"])
        table.add_row(escape(row["name"]), ratio, val, test, status)
    console.print(table)
    if report:
        _refresh_report(results, reports_dir)
    failed = [r for r in records if r.get("status") in (FAILED, OOM)]
    if failed:
        err_console.print(
            f"{len(failed)} of {len(records)} runs failed or ran out of memory (exit status 1); their errors are in "
            f"{escape(str(results))}/<run id>/result.json",
            soft_wrap=True,
        )
        raise typer.Exit(1)


def _refresh_report(results: Path, out: Path) -> None:
    try:
        from petlbench.reports import build_report
    except ImportError:
        console.print("[yellow]report: the reports module is not available in this install[/yellow]")
        return
    index = build_report(results, out)
    console.print(f"report written: [bold]{index}[/bold]")


class MethodEntry(TypedDict):
    """One method as `petlbench methods` lists it."""

    method: str
    name: str
    options: list[dict[str, Any]]


@app.command("methods")
def list_methods(as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False) -> None:
    """List the methods with their display names and options (defaults and help)."""
    from petlbench.core.catalog import method_cards

    entries: list[MethodEntry] = [
        {"method": card.key, "name": card.display_name, "options": [o.as_dict() for o in card.options]}
        for card in method_cards()
    ]
    if as_json:
        print(json.dumps(entries, indent=2, default=str))
        return
    table = Table(title="Methods (set options with --opt METHOD.KEY=VALUE)")
    table.add_column("key")
    table.add_column("name")
    table.add_column("options (default) — help")
    for entry in entries:
        opts = "\n".join(f"{o['name']}={_show(o['default'])} — {o['help']}" for o in entry["options"]) or "—"
        table.add_row(entry["method"], entry["name"], opts)
    console.print(table)


def _sizes(resolved: Any, name: str, unit: str, prefix: str = "") -> str:
    """One run setting for the header: its value, or each method's where `auto` chose them per method."""
    values = {cfg.method: getattr(cfg, name) for _, cfg in resolved.configs}
    if len(set(values.values())) == 1:
        return f"{prefix}{next(iter(values.values()))}{unit}"
    return f"{prefix}" + ", ".join(f"{key} {value}{unit}" for key, value in values.items())


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


@app.command()
def params(
    backbone: Annotated[str, typer.Option(help="timm ViT name.")] = "vit_base_patch16_224",
    res: Annotated[int, typer.Option(help="Input resolution.")] = 512,
    num_classes: Annotated[int, typer.Option(help="Number of classes.")] = 5,
    methods: Annotated[str, typer.Option(help="'all' or comma-separated keys.")] = "all",
    opt: Annotated[list[str] | None, typer.Option(help=OPT_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per method.")] = False,
) -> None:
    """Trainable and total parameter counts and their ratio (%) for every method (Table I's Params)."""
    from petlbench.backbones.vit import check_resolution
    from petlbench.core.method import BackboneSpec, parse_method_keys
    from petlbench.core.options import parse_opt_flags
    from petlbench.profiling.params import param_row

    try:
        keys = parse_method_keys(methods)
        overrides = parse_opt_flags(opt)
        check_resolution(backbone, res)
        rows = [param_row(k, BackboneSpec(backbone), res, num_classes, overrides.get(k)) for k in keys]
    except user_errors() as err:
        fail(str(err))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"Parameters · {backbone} · {res}px · {num_classes} classes")
    for column in ("method", "name", "trainable", "total", "ratio %"):
        table.add_column(column, justify="right" if column not in ("method", "name") else "left")
    for row in rows:
        table.add_row(
            row["method"], row["name"], f"{row['trainable']:,}", f"{row['total']:,}", f"{row['ratio_pct']:.4f}"
        )
    console.print(table)


@datasets_app.command("synth")
def datasets_synth(
    out: Annotated[Path, typer.Option(help="Output folder (train/val/test/<class>/*.jpg).")],
    n_per_class: Annotated[int | None, typer.Option(help="Images per class (all splits together).")] = None,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 1024,
    classes: Annotated[int | None, typer.Option(help="Number of classes.")] = None,
    seed: Annotated[int, typer.Option(help="Generator seed (same seed, same bytes).")] = 0,
) -> None:
    """Generate the deterministic synthetic high-resolution lesion dataset."""
    from petlbench.data.synthetic import generate

    kwargs: dict[str, Any] = {"size": size, "seed": seed}
    if n_per_class is not None:
        kwargs["n_per_class"] = n_per_class
    if classes is not None:
        kwargs["num_classes"] = classes
    path = generate(out, **kwargs)
    console.print(f"synthetic dataset written to [bold]{path or out}[/bold]")


@datasets_app.command("check")
def datasets_check(
    path: Annotated[str, typer.Argument(help="Image folder, CSV manifest or dataset card.")],
    as_json: Annotated[bool, typer.Option("--json", help=JSON_HELP)] = False,
) -> None:
    """List unreadable/empty files, empty classes, classes missing from a split, and class counts per split."""
    from petlbench.data.check import check_dataset

    try:
        report = check_dataset(path)
    except user_errors() as err:
        fail(str(err))
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        console.print(report.to_text(), markup=False)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def preload(
    method: Annotated[str, typer.Option(help="fpt_plus or fpt.")] = "fpt_plus",
    dataset: Annotated[str | None, typer.Option(help="Dataset; default the embedded synthetic set.")] = None,
    results: Annotated[Path, typer.Option(help="Results folder (the cache lives in RESULTS/cache).")] = Path("results"),
    res: Annotated[int, typer.Option(help="LPM input resolution.")] = 512,
    backbone: Annotated[str | None, typer.Option(help="timm ViT name of the LPM.")] = None,
    pretrained: Annotated[bool, typer.Option(help=PRETRAINED_HELP)] = False,
    weights: Annotated[str | None, typer.Option(help=WEIGHTS_HELP)] = None,
    opt: Annotated[list[str] | None, typer.Option(help=OPT_HELP)] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Run the frozen large model once over every image and cache what FPT/FPT+ fusion modules need."""
    from petlbench.engine.runner import RunRequest, check_results_folder, resolve
    from petlbench.fpt.common import preload as run_preload

    try:
        check_results_folder(results)
        resolved = resolve(
            RunRequest(
                methods=method,
                dataset=dataset,
                results=results,
                res=res,
                backbone=backbone,
                pretrained=pretrained,
                weights=weights,
                opts=opt or [],
                device=device,
            ),
            log=console.print,
        )
        info = run_preload(
            resolved.methods[0],
            resolved.source,
            res,
            resolved.backbone,
            results / "cache",
            log=console.print,
            device=resolved.configs[0][1].device,
        )
    except user_errors() as err:
        fail(str(err))
    console.print(json.dumps(info, indent=2, default=str))


def _register_command_modules() -> None:
    """Add every command module of `petlbench.cli` (a module with a `register(app)` function)."""
    import pkgutil

    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name in ("root", "common", "__main__"):
            continue
        module = importlib.import_module(f"petlbench.cli.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_command_modules()


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted: finished runs are stored; re-run the same command to resume")
        sys.exit(130)
