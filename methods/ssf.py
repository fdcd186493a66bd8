"""SSF: Scale and Shift deep Features (Lian et al., NeurIPS 2022, "Scaling & Shifting Your Features").

Every operation of the frozen ViT gets a per-channel affine map y = x · γ + β right after it, as in the
authors' code (github.com/dongzelian/SSF @ e94e0e7, models/vision_transformer.py, lines 134-396 and 520-535:
`Mlp`, `Attention`, `Block`, `PatchEmbed`, `init_ssf_scale_shift`, `ssf_ada`, `VisionTransformer.forward_features`):

* after the patch-embedding projection (`patch_embed.proj`, over its channel axis; and after
  `patch_embed.norm` when that is a norm rather than an Identity);
* in every block after `norm1`, `attn.qkv` (3·D channels, before the split into heads), `attn.proj`,
  `norm2`, `mlp.fc1` (before the activation) and `mlp.fc2`;
* after the final `norm` (before pooling, fc_norm and the head).

Beyond the official ViT (which has none), a `norm_pre` LayerNorm (CLIP-style ViTs) also gets one. γ and β
are the only new parameters; γ ~ N(1, init_std), β ~ N(0, init_std) (official: std 0.02), so the network is
close to, and with init_std = 0 exactly, the pretrained one at step 0. They could be merged into the frozen
weights after training (re-parameterisation), which is not needed for benchmarking and not done here.

Each γ/β pair is a `ScaleShift` child named `ssf` of the module whose output it transforms, applied by a
forward hook: backbone names stay unchanged (`blocks.0.attn.qkv.weight`) and the new ones read
`blocks.0.attn.qkv.ssf.scale`. Only linear/norm outputs change, so timm's fused and explicit attention
paths both work.

Trainable parameters (width D, depth L, MLP hidden H, C classes, any resolution):
    2·(2D + L·(7D + H)) + (D + 1)·C, i.e. 2·(7D + H) per block.
ViT-B/16 (D = 768, L = 12, H = 3072), 5 classes at 512 px: 16,896 per block; 1,536 (patch embed) +
12 · 16,896 + 1,536 (final norm) = 205,824 SSF parameters + 3,845 head = 209,669 trainable of 86,644,229 (0.242 %;
`petlbench params --backbone vit_base_patch16_224 --res 512 --num-classes 5`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from petlbench.backbones.classifier import HEAD_PATTERN, BackboneClassifier, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, register_method
from petlbench.core.options import option

SSF_PATTERN = r"(.+\.)?ssf\.(scale|shift)"
BLOCK_TARGETS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class SSFOptions:
    """Options of SSF."""

    init_std: float = option(0.02, "std of the scale ~ N(1, std) and shift ~ N(0, std) init (0: exact identity)")

    def __post_init__(self) -> None:
        if not (math.isfinite(self.init_std) and self.init_std >= 0.0):
            raise ValueError(f"init_std must be a finite number >= 0, got {self.init_std}")


class ScaleShift(nn.Module):
    """x · scale + shift per channel along `dim` (-1 for tokens [B, N, C], 1 for feature maps [B, C, H, W])."""

    def __init__(
        self,
        num_features: int,
        init_std: float,
        dim: int = -1,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.scale = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.shift = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.reset_parameters(init_std)

    def reset_parameters(self, init_std: float) -> None:
        """scale ~ N(1, init_std), shift ~ N(0, init_std) (ones and zeros when init_std is 0)."""
        with torch.no_grad():
            self.scale.fill_(1.0)
            self.shift.zero_()
            if init_std > 0:
                self.scale.normal_(1.0, init_std)
                self.shift.normal_(0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled and shifted features, in `x`'s dtype."""
        trailing = x.ndim - 1 - (self.dim % x.ndim)
        shape = (-1,) + (1,) * trailing
        return x * self.scale.to(x.dtype).view(shape) + self.shift.to(x.dtype).view(shape)

    def extra_repr(self) -> str:
        """Channel count and axis."""
        return f"{self.scale.numel()}, dim={self.dim}"


def _apply_ssf(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the module's output through its `ssf` child (module-level, so deep copies stay correct)."""
    return module.get_submodule("ssf")(output)


def _num_outputs(module: nn.Module) -> int:
    """Output channels of a Linear, a conv or a norm layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return weight.numel()
    raise TypeError(f"SSF cannot tell the output width of {type(module).__name__}")


def attach_ssf(
    module: nn.Module,
    init_std: float,
    dim: int = -1,
    num_features: int | None = None,
    like: torch.Tensor | None = None,
) -> ScaleShift:
    """Add a `ScaleShift` child `ssf` to `module` and apply it to its output (device/dtype of its weight or `like`)."""
    if hasattr(module, "ssf"):
        raise ValueError(f"{type(module).__name__} already has an `ssf` child")
    reference = next(iter(module.parameters(recurse=False)), like)
    device, dtype = (reference.device, reference.dtype) if reference is not None else (None, None)
    width = num_features if num_features is not None else _num_outputs(module)
    ssf = ScaleShift(width, init_std, dim, device=device, dtype=dtype)
    module.add_module("ssf", ssf)
    module.register_forward_hook(_apply_ssf)
    return ssf


def add_ssf(net: VisionTransformer, init_std: float) -> int:
    """Insert SSF after every operation of a timm ViT (see the module docstring); returns the number added."""
    targets: list[tuple[nn.Module, int, int | None]] = [(net.patch_embed.proj, 1, None)]
    if not isinstance(net.patch_embed.norm, nn.Identity):
        targets.append((net.patch_embed.norm, -1, None))
    if not isinstance(net.norm_pre, nn.Identity):
        targets.append((net.norm_pre, -1, None))
    for index, block in enumerate(net.blocks):
        for path in BLOCK_TARGETS:
            try:
                targets.append((block.get_submodule(path), -1, None))
            except AttributeError:
                raise TypeError(
                    f"SSF needs blocks with {', '.join(BLOCK_TARGETS)}; block {index} has no {path}"
                ) from None
    # The official code scales the output of `norm` even when it is an Identity (models pooling through fc_norm).
    targets.append((net.norm, -1, net.embed_dim if isinstance(net.norm, nn.Identity) else None))
    like = net.patch_embed.proj.weight
    for module, dim, width in targets:
        attach_ssf(module, init_std, dim, width, like)
    return len(targets)


@register_method
class SSF(Method):
    """Train per-channel scales and shifts after every backbone operation, plus the head; the backbone is frozen."""

    key = "ssf"
    rank = 85
    display_name = "SSF"
    Options = SSFOptions

    def build(self, ctx: BuildContext) -> BackboneClassifier:
        """The frozen backbone with SSF after every operation; SSF parameters and the head trainable."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        add_ssf(net, self.options.init_std)
        freeze_except(net, name_matcher([SSF_PATTERN, HEAD_PATTERN]))
        return BackboneClassifier(net)
