"""`petlbench sweep`: the papers' full protocol as one command (grid search on validation, then all seeds)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from petlbench.cli.common import DEVICE_HELP, LOG_TO_HELP

EXECUTORS = ("local", "ray")


def _csv(value: str | None) -> list[str] | None:
    """Comma-separated flag value as a list (None when not given)."""
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


def spec_overrides(
    methods: str | None = None,
    datasets: str | None = None,
    backbones: str | None = None,
    pretrained: bool | None = None,
    weights: str | None = None,
    res: str | None = None,
    seeds: str | None = None,
    lr: str | None = None,
    weight_decay: str | None = None,
    opt: list[str] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Command-line flags as spec keys (flags override the spec file; a repeated --opt key makes a grid)."""
    from petlbench.core.options import parse_opt_flags

    data: dict[str, Any] = {}
    if methods is not None:
        data["methods"] = methods
    if datasets is not None:
        data["datasets"] = _csv(datasets)
    if backbones is not None or pretrained is not None or weights is not None:
        names = _csv(backbones) or []
        if not names:
            from petlbench.sweep.spec import SweepSpecError

            raise SweepSpecError("--pretrained/--weights need --backbones (the timm names they apply to)")
        data["backbones"] = [{"name": n, "pretrained": bool(pretrained), "weights": weights} for n in names]
    if res is not None:
        data["resolutions"] = res
    if seeds is not None:
        data["seeds"] = seeds
    grid = {}
    if lr is not None:
        grid["lr"] = lr
    if weight_decay is not None:
        grid["weight_decay"] = weight_decay
    if grid:
        data["grid"] = grid
    if opt:
        fixed: dict[str, dict[str, Any]] = {}
        grids: dict[str, dict[str, list[str]]] = {}
        values: dict[tuple[str, str], list[str]] = {}
        for flag in opt:
            for method, options in parse_opt_flags([flag]).items():
                for key, value in options.items():
                    values.setdefault((method, key), []).append(value)
        for (method, key), given in values.items():
            if len(given) == 1:
                fixed.setdefault(method, {})[key] = given[0]
            else:
                grids.setdefault(method, {})[key] = given
        if fixed:
            data["method_options"] = fixed
        if grids:
            data["method_grids"] = grids
    data.update({k: v for k, v in settings.items() if v is not None})
    return data


def register(app: typer.Typer) -> None:
    """Add the `sweep` command to the CLI."""

    @app.command("sweep")
    def sweep(
        spec: Annotated[
            str | None,
            typer.Argument(help="Sweep spec YAML (or a built-in name: paper, smoke); flags override its keys."),
        ] = None,
        results: Annotated[
            Path | None, typer.Option(help="Results folder (default: the spec's, else results).")
        ] = None,
        executor: Annotated[str, typer.Option(help="local (one run at a time per GPU, or on CPU) or ray.")] = "local",
        ray_address: Annotated[
            str | None, typer.Option(help="Ray cluster address HOST:PORT (default: RAY_ADDRESS or a local Ray).")
        ] = None,
        gpus_per_run: Annotated[
            float, typer.Option(help="GPUs per Ray task; a fraction (e.g. 0.5) shares a GPU.")
        ] = 1.0,
        cpus_per_run: Annotated[float, typer.Option(help="CPUs per Ray task.")] = 1.0,
        max_retries: Annotated[
            int | None, typer.Option(help="Retries of a run whose worker was lost (default: spec's, else 2).")
        ] = None,
        status: Annotated[
            bool, typer.Option("--status", help="Show done/running/failed/pending counts and exit.")
        ] = False,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="List the planned runs and their count; train nothing.")
        ] = False,
        force: Annotated[bool, typer.Option(help="Redo runs that already finished.")] = False,
        methods: Annotated[str | None, typer.Option(help="'all' or comma-separated method keys.")] = None,
        datasets: Annotated[
            str | None, typer.Option(help="Comma-separated card names, folders or manifests ('embedded' = synthetic).")
        ] = None,
        backbones: Annotated[
            str | None, typer.Option(help="Comma-separated timm ViT names (with weight tags).")
        ] = None,
        pretrained: Annotated[bool | None, typer.Option("--pretrained", help="Load timm's hub weights.")] = None,
        weights: Annotated[str | None, typer.Option(help="Local backbone weights file.")] = None,
        res: Annotated[str | None, typer.Option(help="Comma-separated input resolutions.")] = None,
        seeds: Annotated[
            str | None, typer.Option(help="Comma-separated seeds; the first one searches the grid.")
        ] = None,
        lr: Annotated[str | None, typer.Option(help="Comma-separated learning rates (the grid).")] = None,
        weight_decay: Annotated[str | None, typer.Option(help="Comma-separated weight decays (the grid).")] = None,
        opt: Annotated[
            list[str] | None, typer.Option(help="Method option METHOD.KEY=VALUE; repeat a key for a grid over it.")
        ] = None,
        epochs: Annotated[int | None, typer.Option(help="Epochs per run.")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
        device: Annotated[str | None, typer.Option(help=DEVICE_HELP)] = None,
        amp: Annotated[str | None, typer.Option(help="none or bf16.")] = None,
        attention: Annotated[str | None, typer.Option(help="auto, fused or explicit.")] = None,
        workers: Annotated[int | None, typer.Option(help="Data-loading worker processes per run.")] = None,
        profile: Annotated[
            bool | None, typer.Option("--profile/--no-profile", help="Measure efficiency per run.")
        ] = None,
        log_to: Annotated[str | None, typer.Option(help=LOG_TO_HELP)] = None,
        data_root: Annotated[
            str | None,
            typer.Option(help="Folder holding the card datasets (<root>/<key>/); sets PETLBENCH_DATA_ROOT."),
        ] = None,
    ) -> None:
        """Search lr x weight decay on validation AUC per cell with one seed, then run all seeds at the best point."""
        from petlbench.cli.common import check_log_to, fail
        from petlbench.sweep.spec import load_spec

        if executor not in EXECUTORS:
            fail(f"--executor {executor!r}: use local or ray")
        if gpus_per_run <= 0 or cpus_per_run <= 0:
            fail("--gpus-per-run and --cpus-per-run must be > 0")
        try:
            overrides = spec_overrides(
                methods=methods,
                datasets=datasets,
                backbones=backbones,
                pretrained=pretrained,
                weights=weights,
                res=res,
                seeds=seeds,
                lr=lr,
                weight_decay=weight_decay,
                opt=opt,
                epochs=epochs,
                batch_size=batch_size,
                device=device,
                amp=amp,
                attention=attention,
                workers=workers,
                profile=profile,
                log_to=log_to,
                data_root=data_root,
                max_retries=max_retries,
            )
            spec_obj = load_spec(spec, overrides)
        except _spec_errors() as err:
            fail(escape(str(err)))
        results_dir = Path(results or spec_obj.results or "results")
        if spec_obj.data_root:
            os.environ["PETLBENCH_DATA_ROOT"] = str(Path(spec_obj.data_root).expanduser().absolute())
        if dry_run:
            _dry_run(spec_obj, results_dir, executor)
            return
        if status:
            _status(spec_obj, results_dir)
            return
        check_log_to(",".join(spec_obj.log_to))  # the spec named known trackers; are they installed here?
        _run(spec_obj, results_dir, executor, ray_address, gpus_per_run, cpus_per_run, force)


def _spec_errors() -> tuple[type[BaseException], ...]:
    """A bad sweep spec plus the CLI's user errors (see `user_errors`)."""
    from petlbench.cli.common import user_errors
    from petlbench.sweep.spec import SweepSpecError

    return (SweepSpecError, *user_errors())


def _planning_device(spec: Any, results: Path) -> str:
    """Device the run ids are planned for without starting anything: the last run's, else the spec's."""
    from petlbench.sweep.status import read_state

    state = read_state(results, spec.name)
    if spec.device == "auto" and state.get("device"):
        return str(state["device"])
    if spec.device.startswith("cuda"):
        return "cuda"
    if spec.device == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _plan(spec: Any, results: Path, device: str, read_only: bool) -> Any:
    """Build the plan, turning spec and data errors into a clean exit."""
    from petlbench.cli.common import fail
    from petlbench.sweep.plan import build_plan

    try:
        return build_plan(spec, results, device=device, read_only=read_only, log=lambda message: None)
    except _spec_errors() as err:
        fail(escape(str(err)))
    except ValueError as err:
        fail(escape(str(err)))
    return None


def _dry_run(spec: Any, results: Path, executor: str) -> None:
    """Print every planned run, the count, and which data roots are missing."""
    from petlbench.cli.common import console
    from petlbench.sweep.status import dry_run_lines

    device = _planning_device(spec, results)
    plan = _plan(spec, results, device, read_only=True)
    for line in dry_run_lines(plan):
        print(line)
    grid = len(spec.grid.points())
    option_points = sum(len(spec.option_points(m)) for m in spec.methods)
    first = "search" if grid > 1 else "first-seed"
    console.print(
        f"[bold]{plan.total} runs planned[/bold] for sweep {spec.name}: {len(plan.cells)} cells ({option_points} "
        f"method/option points x {len(spec.datasets)} datasets x {len(spec.backbones)} backbones x "
        f"{len(spec.resolutions)} resolutions), each {grid} grid point(s) with seed {spec.seeds[0]} + "
        f"{len(spec.seeds) - 1} more seed(s) at the best point = {plan.search_total} {first} + "
        f"{plan.total - plan.search_total} final runs · device {device} · executor {executor} · results {results}",
        soft_wrap=True,
    )
    missing: dict[str, str] = {}
    for group in plan.missing:
        missing.setdefault(group.dataset or "embedded", (group.error or "").strip().splitlines()[0])
    if missing:
        console.print(
            f"[yellow]data missing for {len(missing)} of {len(spec.datasets)} datasets[/yellow] (run ids are shown "
            "once the data is there; set --data-root or PETLBENCH_DATA_ROOT to the folder holding <card key>/, and "
            "see each card in datasets/cards/ for where to get the data):",
            soft_wrap=True,
        )
        for dataset, error in missing.items():
            console.print(f"  [bold]{escape(dataset)}[/bold]: {escape(error)}", highlight=False, soft_wrap=True)
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def _status(spec: Any, results: Path) -> None:
    """Print done/running/failed/pending counts, failure reasons and each cell's outcome."""
    from petlbench.cli.common import console, err_console, plain_log
    from petlbench.core.results import ResultStore
    from petlbench.sweep.status import render_cells, render_status, sweep_status

    plan = _plan(spec, results, _planning_device(spec, results), read_only=True)
    store = ResultStore(results, log=plain_log(err_console))  # reads only: works on a folder this user cannot write
    render_status(sweep_status(plan, store), console)
    render_cells(plan, store, console)


def _run(
    spec: Any,
    results: Path,
    executor_name: str,
    ray_address: str | None,
    gpus_per_run: float,
    cpus_per_run: float,
    force: bool,
) -> None:
    """Plan, take the driver lock, run the sweep with the live view, then summarise."""
    from petlbench.cli.common import console, err_console, fail, plain_log
    from petlbench.core.environment import resolve_device
    from petlbench.core.results import ResultsFolderError, ResultStore
    from petlbench.sweep.executors import LocalExecutor, PoolExecutor, RayExecutor, local_devices, run_sweep
    from petlbench.sweep.status import DriverLock, LiveView, SweepBusyError, render_cells, render_status, sweep_status

    store = ResultStore(results, log=plain_log(err_console))
    try:
        store.check_writable()
    except ResultsFolderError as err:
        fail(f"{err}: choose another with --results")
    executor: Any
    if executor_name == "ray":
        try:
            executor = RayExecutor(
                store,
                address=ray_address,
                gpus_per_run=0.0 if spec.device == "cpu" else gpus_per_run,
                cpus_per_run=cpus_per_run,
                max_retries=spec.max_retries,
                log=plain_log(console),
            )
        except (RuntimeError, ValueError) as err:
            fail(escape(str(err)))
        device = executor.device
        if spec.device.startswith("cuda") and device != "cuda":
            executor.close()
            fail(f"device {spec.device!r} asked for, but the Ray cluster at {ray_address or 'auto'} has no GPUs")
        slots = f"{executor.capacity()} slots"
    else:
        try:
            device = resolve_device(spec.device).type
        except ValueError as err:
            fail(escape(str(err)))
        executor = None
        slots = "1 slot"
    plan = _plan(spec, results, device, read_only=False)
    if plan.missing:
        if executor is not None:
            executor.close()
        lines = escape("\n".join(f"  {g.dataset or 'embedded'}: {g.error}" for g in plan.missing))
        fail(f"data missing for {len({g.dataset for g in plan.missing})} dataset(s) (see --dry-run):\n{lines}")
    lock = DriverLock(results, spec.name)
    try:
        lock.acquire(
            {
                "name": spec.name,
                "spec": spec.source,
                "device": device,
                "executor": executor_name,
                "total_runs": plan.total,
            }
        )
    except SweepBusyError as err:
        if executor is not None:
            executor.close()
        fail(escape(str(err)))
    view = LiveView(console, plan, f"{executor_name} ({slots})")
    if executor is None:
        devices = local_devices(device)
        if len(devices) > 1:
            executor = PoolExecutor(devices, store, spec.max_retries, log=plain_log(console))
            view.executor_name = f"local ({len(devices)} GPUs)"
        else:
            executor = LocalExecutor(hooks_for=view.hooks_for)
    for note in plan.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(
        f"sweep [bold]{spec.name}[/bold]: {plan.total} runs in {len(plan.cells)} cells · device {device} · "
        f"results {results}"
    )
    try:
        run_sweep(plan, store, executor, force=force, observer=view)
    finally:
        view.stop()
        lock.release()
    final = sweep_status(plan, store)
    render_status(final, console)
    render_cells(plan, store, console)
    counts = final.counts()
    if counts["failed"] or counts["pending"]:
        raise typer.Exit(1)
