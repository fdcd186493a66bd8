"""`petlbench paper-check`: the papers' printed efficiency values beside petlbench's, from the estimator alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def paper_check(
    out: Annotated[Path, typer.Option(help="Report folder (paper_check.md and paper_check.csv go there).")] = Path(
        "reports"
    ),
    preset: Annotated[str, typer.Option(help="Conventions to compare under (see `--preset` of run).")] = "paper",
) -> None:
    """Compare Table I Params and Mem., Table II FLOPs, Table III memory and '/' cells, Tables V-VI Params."""
    from petlbench.cli.common import console, fail
    from petlbench.core.config import ConfigError
    from petlbench.core.preset import get_preset
    from petlbench.reports.paper_check import paper_check as run_check

    try:
        get_preset(preset)
    except ConfigError as err:
        fail(str(err))
    result = run_check(out, preset, log=lambda line: console.print(line, markup=False, soft_wrap=True))
    rows = result["rows"]
    params = [r for r in rows if r.kind.startswith("params")]
    oom = [r for r in rows if r.paper_oom is not None]
    console.print(
        f"{sum(bool(r.matches_digits) for r in params)} of {len(params)} printed Params values reproduced; "
        f"{sum(r.paper_oom == r.ours_oom for r in oom)} of {len(oom)} Table III cells agree on fitting in 48 GB",
        markup=False,
        soft_wrap=True,
    )
    console.print(f"paper check written: {', '.join(result['paths'])} ({result['seconds']:.0f}s)", markup=False)
    console.print(f"`petlbench report --out {out}` links it from index.md", markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `paper-check` to the CLI."""
    app.command("paper-check")(paper_check)
