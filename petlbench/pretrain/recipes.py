"""Pre-training recipes: which generated images, how many categories and instances, and the training budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from petlbench.core.registry import Registry
from petlbench.pretrain import generators

# Renders instances of categories: (seed, labels, stream) -> uint8 [N, size, size, 3]; categories drawn from seed.
Renderer = Callable[[int, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class Recipe:
    """A formula-driven supervised pre-training recipe: data (family, categories, instances, size) and budget."""

    name: str
    family: str  # "fractal" or "contour": which generator draws the images
    description: str
    reference: str
    classes: int = 64
    per_class: int = 96  # training instances per category, generated once before training
    held_out: int = 8  # instances per category kept aside to measure pre-training accuracy
    size: int = 64  # pre-training resolution (the position table is resampled to the run's resolution at use)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.05  # share of the steps with a linear learning-rate warm-up
    label_smoothing: float = 0.1
    background: bool = False  # draw on a smooth random-colour canvas instead of black

    def identity(self) -> dict[str, Any]:
        """Every field that changes the weights (the description does not)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("description", "reference")}

    def renderer(self, seed: int) -> Renderer:
        """The instance renderer of this recipe's categories drawn from `seed`."""
        if self.family == "fractal":
            maps, prob = generators.ifs_systems(seed, self.classes, self.size)
            return lambda s, labels, stream: generators.fractal_images(
                maps, prob, labels, self.size, s, stream, background=self.background
            )
        if self.family == "contour":
            cats = generators.contour_categories(seed, self.classes)
            return lambda s, labels, stream: generators.contour_images(cats, labels, self.size, s, stream)
        raise ValueError(f"recipe {self.name}: unknown image family {self.family!r}")


RECIPES: Registry[Recipe] = Registry("pre-training recipe")
FRACTAL_REF = "FractalDB: Kataoka et al., Pre-training without Natural Images, ACCV 2020 / IJCV 2022"
CONTOUR_REF = "RCDB: Kataoka et al., Replacing Labeled Real-image Datasets with Auto-generated Contours, CVPR 2022"

for _recipe in (
    Recipe("fractal", "fractal", "FractalDB-style: IFS fractal categories, point clouds on black", FRACTAL_REF),
    Recipe(
        "fractal-bg",
        "fractal",
        "FractalDB-style fractals on smooth random-colour canvases instead of black",
        FRACTAL_REF,
        background=True,
    ),
    Recipe("contour", "contour", "RCDB-style: radial contours of noisy polygons on black", CONTOUR_REF),
    Recipe(
        "fractal-tiny",
        "fractal",
        "FractalDB-style at a test budget (seconds): few categories, few steps",
        FRACTAL_REF,
        classes=8,
        per_class=16,
        held_out=2,
        size=32,
        steps=30,
        batch_size=32,
        warmup=0.1,
    ),
):
    RECIPES.register(_recipe.name, _recipe)


def get_recipe(name: str) -> Recipe:
    """The recipe registered as `name` (RegistryError with suggestions otherwise)."""
    return RECIPES.get(name)
