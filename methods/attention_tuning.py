"""Attention tuning (Touvron et al., "three things"): the attention sub-modules of every block plus the head."""

from __future__ import annotations

from dataclasses import dataclass

from petlbench.backbones.classifier import HEAD_PATTERN, BackboneClassifier, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, register_method
from petlbench.core.options import option

ATTENTION_PATTERN = r"blocks\.\d+\.attn\..+"

# Extra parameter groups for sensitivity runs (pos_embed + norm1 close the ratio gap).
EXTRA_PATTERNS: dict[str, str] = {
    "pos_embed": r"pos_embed",
    "cls_token": r"cls_token",
    "patch_embed": r"patch_embed\..+",
    "norm1": r"blocks\.\d+\.norm1\..+",
    "norm2": r"blocks\.\d+\.norm2\..+",
    "norm": r"norm\..+",
}


@dataclass(frozen=True)
class AttentionTuningOptions:
    """Options of attention tuning."""

    extra: tuple[str, ...] = option(
        (),
        f"extra parameter groups to train besides attn.* and head, comma-separated: {', '.join(EXTRA_PATTERNS)}",
    )

    def __post_init__(self) -> None:
        unknown = [name for name in self.extra if name not in EXTRA_PATTERNS]
        if unknown:
            raise ValueError(f"unknown extra group(s) {unknown}; choose from {', '.join(EXTRA_PATTERNS)}")
        if len(set(self.extra)) != len(self.extra):
            raise ValueError(f"extra lists a group twice: {list(self.extra)}")


@register_method
class AttentionTuning(Method):
    """Train `blocks.*.attn.*` (qkv and proj) and the head; optional extra groups from `extra`."""

    key = "attention_tuning"
    rank = 40
    display_name = "Attention-tuning"
    Options = AttentionTuningOptions

    def build(self, ctx: BuildContext) -> BackboneClassifier:
        """The backbone with only attention parameters, the head and the chosen extras trainable."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        patterns = [ATTENTION_PATTERN, HEAD_PATTERN, *(EXTRA_PATTERNS[name] for name in self.options.extra)]
        freeze_except(net, name_matcher(patterns))
        return BackboneClassifier(net)
