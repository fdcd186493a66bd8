"""Formula-driven pre-training: deterministic generators, the weights cache and its card, labels in run records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from petlbench.cli import app
from petlbench.core.registry import RegistryError
from petlbench.pretrain import generators
from petlbench.pretrain.recipes import RECIPES, get_recipe
from petlbench.pretrain.train import (
    CARD_SUFFIX,
    copy_pretrained,
    ensure_pretrained,
    generated_label,
    read_card,
)

TINY = "fractal-tiny"


@pytest.fixture
def lpm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh generated-data folder, so that each test pre-trains (or reuses) in isolation."""
    monkeypatch.setenv("PETLBENCH_DATA", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.mark.parametrize("name", RECIPES.names())
def test_generators_are_deterministic_and_vary(name: str) -> None:
    """Same seed, same bytes; instances of a category differ; images are not blank."""
    recipe = dataclasses.replace(get_recipe(name), classes=4, size=32)
    labels = np.array([0, 0, 1, 2, 3])
    first = recipe.renderer(0)(0, labels, 0)
    again = recipe.renderer(0)(0, labels, 0)
    assert first.shape == (5, 32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first[0], first[1])  # two instances of one category
    assert (first.reshape(5, -1).max(axis=1) > 0).all()
    assert not np.array_equal(first, recipe.renderer(1)(1, labels, 0))


def test_fractal_systems_pass_the_filling_test() -> None:
    """Every kept IFS covers at least FRACTAL_MIN_FILL of a canvas; probabilities sum to one."""
    maps, prob = generators.ifs_systems(3, 6, 32)
    assert maps.shape == (6, generators.FRACTAL_MAPS[1], 2, 3)
    assert np.allclose(prob.sum(axis=1), 1.0, atol=1e-5)
    points = generators.chaos_game(maps, prob, np.random.default_rng(0), points=512, steps=24)
    canvas = generators.render_points(points, 32, np.ones((6, 3), np.float32))
    assert ((canvas.max(axis=-1) > 0).mean(axis=(1, 2)) >= generators.FRACTAL_MIN_FILL * 0.8).all()


def test_unknown_recipe_is_named() -> None:
    with pytest.raises(RegistryError, match="fractal"):
        get_recipe("fractl")


def test_pretrain_caches_weights_with_a_card(lpm_home: Path, tmp_path: Path) -> None:
    """A tiny pre-training writes safetensors + card once; the second call reuses it; --out copies both."""
    recipe = get_recipe(TINY)
    lines: list[str] = []
    first = ensure_pretrained(recipe, "test_vit", 0, log=lines.append)
    assert not first.reused and first.weights.is_file() and first.weights.is_relative_to(lpm_home)
    assert any(line.startswith(f"step {recipe.steps}/{recipe.steps}") for line in lines)
    card = first.card
    assert card["recipe"]["name"] == TINY and card["steps"] == recipe.steps and card["seed"] == 0
    assert {"generate", "train", "total"} <= set(card["seconds"]) and "torch" in card["versions"]
    assert 0.0 <= card["held_out_accuracy"] <= 100.0
    again = ensure_pretrained(recipe, "test_vit", 0, log=lines.append)
    assert again.reused and again.weights == first.weights
    out = copy_pretrained(again, tmp_path / "lpm.safetensors")
    assert read_card(out) == card and out.with_suffix(CARD_SUFFIX).is_file()
    out.write_bytes(out.read_bytes() + b" ")  # altered weights no longer match their card
    assert read_card(out) is None


def test_generated_weights_are_labelled_as_such(lpm_home: Path, tmp_path: Path) -> None:
    """A run on generated weights stores the recipe in its weights label (and the file's digest in its id)."""
    from petlbench.data.synthetic import generate
    from petlbench.engine.runner import RunRequest, resolve

    result = ensure_pretrained(get_recipe(TINY), "test_vit", 0, log=lambda line: None)
    out = copy_pretrained(result, tmp_path / "lpm.safetensors")
    data = generate(tmp_path / "synth", n_per_class=3, size=64, num_classes=2)
    request = RunRequest(
        methods="linear_probe", dataset=str(data), results=tmp_path / "results", res=64, backbone="test_vit"
    )
    resolved = resolve(dataclasses.replace(request, weights=str(out)), log=lambda line: None)
    label = resolved.configs[0][1].weights
    assert label.startswith(f"{generated_label(result.card)}:file:lpm.safetensors#")
    assert any("generated formula-driven images" in note for note in resolved.notes)
    assert resolved.configs[0][1].run_id != resolve(request, log=lambda line: None).configs[0][1].run_id
    plain = tmp_path / "plain.safetensors"
    plain.write_bytes(out.read_bytes())  # same bytes, no card: an ordinary weights file
    other = resolve(dataclasses.replace(request, weights=str(plain)), log=lambda line: None)
    assert other.configs[0][1].weights.startswith("file:plain.safetensors#")


def test_cli_pretrain(lpm_home: Path, tmp_path: Path) -> None:
    """`petlbench pretrain` lists recipes, refuses bad input before work, and writes --out with its card."""
    runner = CliRunner()
    listed = runner.invoke(app, ["pretrain", "--list"])
    assert listed.exit_code == 0 and all(name in listed.output for name in RECIPES.names())
    bad = runner.invoke(app, ["pretrain", "--recipe", "nope"])
    assert bad.exit_code == 2 and "unknown pre-training recipe" in bad.output
    assert runner.invoke(app, ["pretrain", "--out", str(tmp_path / "x.pt")]).exit_code == 2
    assert runner.invoke(app, ["pretrain", "--steps", "0"]).exit_code == 2
    out = tmp_path / "lpm.safetensors"
    done = runner.invoke(app, ["pretrain", "--recipe", TINY, "--out", str(out), "--json"])
    assert done.exit_code == 0, done.output
    assert "held-out accuracy" in done.output and out.is_file()
    assert json.loads(out.with_suffix(CARD_SUFFIX).read_text())["recipe"]["name"] == TINY
