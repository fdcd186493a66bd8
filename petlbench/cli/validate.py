"""`petlbench validate` (`make gpu-check`): every check that needs a GPU in one time-boxed command; a thin wrapper
around `petlbench.profiling.validate`, which it imports only once the command runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

# Kept here as well as in petlbench.profiling.validate so that `--help` does not import torch.
EXIT_CODES = (
    "Exit status: 0 every check ran; 1 a check failed (its error is in the results, which are written); 2 bad "
    "options; 3 no CUDA device visible (nothing measured, nothing written; --dry-run works anywhere); 4 the time "
    "budget ran out before every check or configuration ran (partial results written)."
)


def validate(
    budget_s: Annotated[
        float, typer.Option("--budget-s", help="Time budget of the whole command in seconds (checks stop in time).")
    ] = 480.0,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for <gpu-slug>.json/.md; default results/reference (--quick: results/validate-quick)."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (checks, configurations, time budgets) and exit 0.")
    ] = False,
    device: Annotated[str, typer.Option(help="cuda or cuda:N (cpu only with the --quick rehearsal).")] = "cuda",
    methods: Annotated[str, typer.Option(help="Memory check: 'all' or comma-separated method keys.")] = "all",
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", hidden=True, help="Rehearsal: test_vit, 64 px, batch 2, 2 methods (with --device cpu: on CPU)."
        ),
    ] = False,
) -> None:
    """Measure on one GPU what only a GPU can: memory peaks vs the estimator (every method, fused and explicit
    attention), the CUDA context size, NVML power vs the energy counter, FPT+ / full fine-tuning throughput."""
    started = time.monotonic()  # the budget counts the imports below
    from petlbench.cli.common import console, err_console, fail, plain_log, user_errors

    if not budget_s > 0:
        fail(f"--budget-s {budget_s}: must be a positive number of seconds")
    if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        fail(f"--device {device!r}: use cuda, cuda:N (or cpu with --quick)")
    if device == "cpu" and not quick:
        fail("--device cpu runs only the --quick rehearsal (ViT-B/16 at 512 px is a GPU workload)")

    import torch

    from petlbench.core.method import parse_method_keys
    from petlbench.profiling import validate as v

    try:
        keys = tuple(parse_method_keys(methods)) if methods != "all" else ()
        config = v.quick_config(keys) if quick else v.ValidateConfig(methods=keys)
        config.method_keys()
    except user_errors() as err:
        fail(str(err))
    dev = torch.device(device)
    out_dir = out if out is not None else (v.QUICK_OUT if quick else v.DEFAULT_OUT)
    if dry_run:
        plan = v.build_plan(config, budget_s)
        console.print(v.format_plan(plan, config, budget_s, v.cuda_device_line(dev)), markup=False, soft_wrap=True)
        console.print(f"results would go to {out_dir}/<slug>.json and .md", markup=False, soft_wrap=True)
        return
    if dev.type == "cuda" and not torch.cuda.is_available():
        err_console.print(v.no_cuda_message(), markup=False, soft_wrap=True)
        raise typer.Exit(v.EXIT_NO_CUDA)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        fail(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    log = plain_log(console)
    log(v.format_plan(v.build_plan(config, budget_s), config, budget_s, v.cuda_device_line(dev)))
    report, code = v.run_validate(config, dev, out_dir, budget_s, started=started, log=log)
    if report.get("cuda_context_line"):
        log("Add inside CUDA_CONTEXT_MB = {...} in petlbench/profiling/allocator.py:")
        log(report["cuda_context_line"])
    log(f"written: {', '.join(report.get('paths', []))} ({report['elapsed_s']:.0f} s, exit {code})")
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add `validate` to the CLI."""
    app.command("validate", epilog=EXIT_CODES)(validate)
