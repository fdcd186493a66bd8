"""Position tables at another resolution: timm's one-off resampling, or the FPT authors' per-forward interpolation.

`timm` (default): the table is resampled once when the model is built at the run's resolution (bicubic, antialiased,
to exactly the new grid). `official`: the model keeps its pre-trained table (e.g. 577 rows for a 384-px ViT-B/16) and
interpolates it on every forward as the authors' code does (the DINO recipe): bicubic, no antialias,
`scale_factor = (g + 0.1) / g0` for a g x g patch grid from a g0 x g0 table. The two give slightly different
tables, hence slightly different important-token sets and logits; the papers' numbers come from `official`.
"""

from __future__ import annotations

import math
import types
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

PosInterp = Literal["timm", "official"]
POS_INTERP_CHOICES: tuple[PosInterp, ...] = ("timm", "official")


def interpolate_official(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """`pos_embed` [1, 1 + g0², C] (class token first) for a `grid` x `grid` patch grid, the authors' way."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    g0 = math.isqrt(patch_pos.shape[1])
    if g0 * g0 != patch_pos.shape[1]:
        raise ValueError(f"a square position table was expected, got {patch_pos.shape[1]} patch rows")
    if grid == g0:
        return pos_embed
    dim = pos_embed.shape[-1]
    # + 0.1 so that floor(g0 * scale) is exactly `grid` despite floating point (the authors' code, after DINO)
    scale = (grid + 0.1) / g0
    table = patch_pos.reshape(1, g0, g0, dim).permute(0, 3, 1, 2)
    table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if table.shape[-2:] != (grid, grid):
        raise ValueError(f"interpolating a {g0}x{g0} table by {scale} gave {tuple(table.shape[-2:])}, not {grid}")
    return torch.cat([cls_pos, table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)], dim=1)


def _official_pos_embed(self: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """timm's `_pos_embed` for a plain ViT (class token, no register tokens), with the authors' interpolation."""
    if x.ndim == 4:  # [B, H, W, C] from a patch embedding that keeps the grid (timm's dynamic_img_size)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    grid = math.isqrt(x.shape[1])
    assert self.cls_token is not None and self.pos_embed is not None  # checked by use_official_pos_interp
    cls = self.cls_token.expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + interpolate_official(self.pos_embed, grid)
    return self.pos_drop(x)


def use_official_pos_interp(model: VisionTransformer, img_size: int) -> None:
    """Let `model` (built at its pre-trained size) take `img_size` inputs, interpolating its table every forward."""
    if model.cls_token is None or model.reg_token is not None or model.no_embed_class or model.pos_embed is None:
        raise ValueError("pos_interp=official needs a plain ViT: class token, no register tokens, table incl. class")
    patch_embed = model.patch_embed
    patch = int(patch_embed.patch_size[0])
    patch_embed.img_size = (img_size, img_size)
    patch_embed.grid_size = (img_size // patch, img_size // patch)
    patch_embed.num_patches = (img_size // patch) ** 2
    model._pos_embed = types.MethodType(_official_pos_embed, model)  # type: ignore[method-assign]
