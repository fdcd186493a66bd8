"""LoRA on the query and value projections of every block, via peft on a split qkv."""

from __future__ import annotations

from dataclasses import dataclass

from petlbench.backbones.classifier import BackboneClassifier
from petlbench.backbones.peft_adapters import QV_TARGET_REGEX, wrap_qv
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, register_method
from petlbench.core.options import option


@dataclass(frozen=True)
class LoRAOptions:
    """Options of LoRA (standard peft ViT recipe: r 16, alpha 16, dropout 0.1)."""

    r: int = option(16, "rank of the low-rank update of q and v")
    alpha: float = option(16.0, "lora_alpha; the update is scaled by alpha / r")
    dropout: float = option(0.1, "dropout on the input of the low-rank branch")

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@register_method
class LoRA(Method):
    """Train low-rank updates of attn.q and attn.v (never k) and the head; the backbone is frozen."""

    key = "lora"
    rank = 70
    display_name = "LoRA"
    Options = LoRAOptions

    def build(self, ctx: BuildContext) -> BackboneClassifier:
        """The backbone with split qkv, peft LoRA on q and v, and a trainable head."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        from peft import LoraConfig  # imported on use: listing methods must not load peft

        config = LoraConfig(
            r=self.options.r,
            lora_alpha=self.options.alpha,
            lora_dropout=self.options.dropout,
            target_modules=QV_TARGET_REGEX,
            bias="none",
        )
        return BackboneClassifier(wrap_qv(net, config))
