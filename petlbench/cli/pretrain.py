"""`petlbench pretrain`: a small ViT LPM pre-trained on generated formula-driven images, no download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def pretrain(
    recipe: Annotated[str, typer.Option(help="Recipe name (see --list).")] = "fractal",
    out: Annotated[
        Path | None, typer.Option(help="Also copy the weights to this .safetensors file (card beside it).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generated categories, instances and training.")] = 0,
    backbone: Annotated[
        str | None, typer.Option(help="timm ViT to pre-train; default the embedded default's backbone.")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the recipe's).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for training (1 is fastest on a shared CPU).")] = 1,
    force: Annotated[bool, typer.Option(help="Pre-train again although the cache holds these weights.")] = False,
    list_recipes: Annotated[bool, typer.Option("--list", help="List the recipes and exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON at the end.")] = False,
) -> None:
    """Pre-train a ViT on generated images (FractalDB / RCDB style), cached by recipe, backbone and seed."""
    import dataclasses

    from petlbench.backbones.vit import TINY_BACKBONE, check_resolution
    from petlbench.cli.common import console, fail, plain_log, user_errors
    from petlbench.core.registry import RegistryError
    from petlbench.pretrain.recipes import RECIPES, get_recipe
    from petlbench.pretrain.train import PretrainError, copy_pretrained, ensure_pretrained

    if list_recipes:
        for name in RECIPES.names():
            r = get_recipe(name)
            console.print(
                f"{name}: {r.description}; {r.classes} categories x {r.per_class} images at {r.size}px, "
                f"{r.steps} steps of batch {r.batch_size} ({r.reference})",
                markup=False,
            )
        raise typer.Exit()
    try:
        chosen = get_recipe(recipe)
    except RegistryError as err:
        fail(str(err))
    if steps is not None:
        if steps < 1:
            fail(f"--steps must be at least 1, got {steps}")
        chosen = dataclasses.replace(chosen, steps=steps)
    if seed < 0:
        fail(f"--seed must be non-negative, got {seed}")
    if threads < 1:
        fail(f"--threads must be at least 1, got {threads}")
    if out is not None and out.suffix != ".safetensors":
        fail(f"--out {out}: give a .safetensors file name")
    name = backbone or TINY_BACKBONE
    log = plain_log(console)
    try:
        check_resolution(name, chosen.size)
        result = ensure_pretrained(chosen, name, seed, log=log, force=force, threads=threads)
        if out is not None:
            copy_pretrained(result, out)
    except PretrainError as err:
        fail(str(err))
    except user_errors() as err:
        fail(str(err))
    card = result.card
    state = "reused from the cache" if result.reused else f"pre-trained in {card['seconds']['total']:.0f}s"
    log(
        f"{chosen.name} LPM ({name}, seed {seed}) {state}: {card['steps']} steps, held-out accuracy "
        f"{card['held_out_accuracy']:.1f}% over {card['data']['categories']} generated categories"
    )
    log(f"weights: {result.weights}" + (f" (copied to {out})" if out is not None else ""))
    if as_json:
        print(json.dumps(card, indent=2))


def register(app: typer.Typer) -> None:
    """Add `pretrain` to the CLI."""
    app.command("pretrain")(pretrain)
