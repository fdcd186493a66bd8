"""`petlbench predict RUN_ID IMAGES...`: class probabilities of new images under a finished run's model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from petlbench.cli.common import DEVICE_HELP


def predict(
    run_id: Annotated[str, typer.Argument(help="A finished run's id (the folder name under --results).")],
    images: Annotated[list[Path], typer.Argument(help="Image files to classify.")],
    results: Annotated[Path, typer.Option(help="Results folder holding the run.")] = Path("results"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per image instead of a table.")
    ] = False,
) -> None:
    """Load the run's saved trainable state onto its backbone (FPT/FPT+ run the LPM online) and classify images."""
    from petlbench.cli.common import console, fail
    from petlbench.core.environment import resolve_device
    from petlbench.core.results import ResultStore
    from petlbench.engine.predict import PredictError
    from petlbench.engine.predict import predict as run_predict

    try:
        rows = run_predict(ResultStore(results), run_id, images, resolve_device(device))
    except (PredictError, ValueError) as err:
        fail(str(err))
    if as_json:
        for row in rows:
            console.print(json.dumps(row), markup=False, soft_wrap=True)
        return
    classes = list(rows[0]["probs"]) if rows else []
    console.print("\t".join(["image", "predicted", *classes]), markup=False, soft_wrap=True)
    for row in rows:
        cells = [row["image"], row["predicted"], *(f"{row['probs'][c]:.4f}" for c in classes)]
        console.print("\t".join(cells), markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add `predict` to the CLI."""
    app.command("predict")(predict)
