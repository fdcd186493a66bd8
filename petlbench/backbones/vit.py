"""Backbones: timm ViTs built at the run's resolution from hub weights, a local file, or random init."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from petlbench.backbones.position import POS_INTERP_CHOICES, use_official_pos_interp
from petlbench.core.method import BackboneSpec
from petlbench.core.registry import did_you_mean

# The embedded default for machines without data or GPU: timm's tiny registered ViT (patch 16, width 64).
TINY_BACKBONE = "test_vit"
LIST_MODELS_HINT = "timm.list_models('vit_*') lists timm's ViTs, timm.list_pretrained('vit_*') their pretrained tags."


class BackboneError(ValueError):
    """A backbone that cannot be built as asked (unknown name, bad resolution, unreadable weights)."""


@functools.cache  # a meta build of the whole model, asked for by every estimate
def patch_size_of(name: str) -> int:
    """Patch size of a timm ViT, read from a meta-device instance (no weights allocated)."""
    with torch.device("meta"):
        model = _create(name, pretrained=False, num_classes=0)
    patch_embed: Any = model.patch_embed  # PatchEmbed or a look-alike: the class varies with the model
    return int(patch_embed.patch_size[0])


def native_parameter_count(name: str) -> int:
    """Parameters of timm's `name` as pre-trained: native resolution, its own classification head (meta build)."""
    with torch.device("meta"):
        model = _create(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def check_resolution(name: str, res: int) -> None:
    """Raise a clear error if `res` is not a positive multiple of the backbone's patch size."""
    patch = patch_size_of(name)
    if res <= 0 or res % patch:
        lower, upper = max(patch, res - res % patch), res - res % patch + patch
        raise BackboneError(
            f"resolution {res} is not divisible by the patch size {patch} of {name}; use e.g. {lower} or {upper}"
        )


def check_model_name(name: str) -> None:
    """Raise BackboneError naming timm's closest names unless timm has the model `name`, pretrained tag included."""
    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        # a tagged name is matched against tagged names, so the suggestion keeps the user's tag where timm has it
        hint = did_you_mean(name, timm.list_pretrained()) if tag else ""
        hint = hint or did_you_mean(base, timm.list_models())
        raise BackboneError(f"unknown timm model {name!r}.{hint or ' No similar name.'} {LIST_MODELS_HINT}")
    if tag:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
        if tag not in tags:
            raise BackboneError(
                f"timm model {base} has no pretrained tag {tag!r}.{did_you_mean(tag, tags)} Its tags: "
                f"{', '.join(tags) or 'none'}"
            )


def _create(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    check_model_name(name)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def create_backbone(spec: BackboneSpec, img_size: int, num_classes: int) -> VisionTransformer:
    """A timm ViT taking `img_size` inputs, all dropout off, a fresh head if num_classes > 0.

    The position table is resampled once at build (`spec.pos_interp="timm"`), or kept at the pre-trained size
    and interpolated on every forward the authors' way (`"official"`, see `backbones.position`).
    """
    check_resolution(spec.name, img_size)
    if spec.pos_interp not in POS_INTERP_CHOICES:
        raise BackboneError(f"pos_interp {spec.pos_interp!r}: use {' or '.join(POS_INTERP_CHOICES)}")
    official = spec.pos_interp == "official"
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=0.0, drop_path_rate=0.0, attn_drop_rate=0.0)
    if not official:
        kwargs["img_size"] = img_size
    if spec.weights:
        path = Path(spec.weights)
        if not path.is_file():
            raise BackboneError(f"--weights {path}: no such file (give a .safetensors or PyTorch checkpoint)")
        # timm's own loader: applies the model's checkpoint filter (position-table resampling, head drop).
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path.resolve()), num_classes=-1)
        pretrained = True
    else:
        pretrained = spec.pretrained
    try:
        model = _create(spec.name, pretrained=pretrained, **kwargs)
    except BackboneError:
        raise
    except (RuntimeError, OSError, ValueError) as err:
        source = spec.weights or "the timm/Hugging Face hub"
        raise BackboneError(
            f"could not load weights for {spec.name} from {source}: {err}. Without network access use "
            f"--weights FILE (safetensors or PyTorch state dict), or drop --pretrained for random init."
        ) from err
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"{spec.name} is not a timm VisionTransformer; petlbench supports plain ViTs")
    if official:
        try:
            use_official_pos_interp(model, img_size)
        except ValueError as err:
            raise BackboneError(f"{spec.name}: {err}") from None
    if num_classes > 0:
        reset_head(model)
    return model


def reset_head(model: VisionTransformer) -> None:
    """Fresh classification head: truncated normal std 0.02, bias 0."""
    head = model.head
    if isinstance(head, nn.Linear):
        trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch checkpoint (accepting {'state_dict'|'model': ...} wrappers)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return obj
