"""Presets: named sets of conventions, applied in one place and recorded with every run.

`paper` reproduces the FPT+ papers' setting as the authors' code runs it (YijinHuang/FPT, torch 2.0, Hugging Face
ViT): eager softmax attention for every method; the position table kept at its pre-trained size and interpolated on
every forward (`pos_interp=official`); the papers' LPM, `vit_base_patch16_384` (weights tag `orig_in21k_ft_in1k`,
Google's ImageNet-21k model fine-tuned on ImageNet-1k, with `--pretrained`); each method's own paper settings
(`Method.preset_options`, e.g. float32 feature caches for FPT/FPT+); parameters counted the official way (the frozen
LPM with its unused 1000-class head and native position table). Any flag given explicitly wins over the preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from petlbench.core.config import Attention, ConfigError
from petlbench.core.method import Method, ParamConvention


@dataclass(frozen=True)
class Preset:
    """Values a preset gives the knobs a user left unset (None: the preset leaves that knob alone)."""

    name: str
    description: str
    attention: Attention | None = None
    pos_interp: str | None = None
    backbone: str | None = None
    pretrained_tag: str | None = None
    param_convention: ParamConvention = "petlbench"


PRESETS: dict[str, Preset] = {
    "none": Preset("none", "petlbench's own defaults"),
    "paper": Preset(
        "paper",
        "the FPT+ papers' conventions: eager attention, the authors' position-table interpolation, the papers' LPM "
        "(vit_base_patch16_384.orig_in21k_ft_in1k with --pretrained), float32 feature caches, official parameter "
        "counts",
        attention="explicit",
        pos_interp="official",
        backbone="vit_base_patch16_384",
        pretrained_tag="vit_base_patch16_384.orig_in21k_ft_in1k",
        param_convention="official",
    ),
}


def get_preset(name: str | None) -> Preset:
    """The preset called `name` (None: "none"); an unknown name raises `ConfigError` listing the known ones."""
    if name is None:
        return PRESETS["none"]
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def backbone_name(preset: Preset, given: str | None, pretrained: bool, fallback: str) -> str:
    """The timm name to build: the user's, else the preset's (with its weights tag when pretrained), else fallback."""
    if given is not None:
        return given
    if preset.backbone is None:
        return fallback
    return preset.pretrained_tag if pretrained and preset.pretrained_tag else preset.backbone


def method_overrides(preset: Preset, method: type[Method], given: dict[str, Any]) -> dict[str, Any]:
    """A method's `--opt` values over the preset's settings for it (the user's win)."""
    return {**dict(method.preset_options.get(preset.name, {})), **given}
