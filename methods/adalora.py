"""AdaLoRA on the query and value projections: adaptive rank budget via peft.

The harness drives AdaLoRA's two training hooks: `extra_loss()` is the orthogonality regulariser (peft only adds
it when the model returns an object with `.loss`), and `after_optimizer_step(step)` runs peft's
`update_and_allocate`, which updates importance scores and masks pruned singular values (`lora_E` entries).
The schedule follows the run length: `total_step` = the trainer's optimizer steps, tinit = round(0.1·T),
tfinal = round(0.2·T) (see `adalora_schedule` for the clamping on very short runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from petlbench.backbones.classifier import BackboneClassifier

if TYPE_CHECKING:
    from peft import PeftModel

from petlbench.backbones.peft_adapters import (
    QV_TARGET_REGEX,
    adalora_orthogonality,
    adalora_schedule,
    adalora_update_and_allocate,
    wrap_qv,
)
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, register_method
from petlbench.core.options import option


@dataclass(frozen=True)
class AdaLoRAOptions:
    """Options of AdaLoRA (peft defaults for the rank budget; schedule as fractions of the run)."""

    init_r: int = option(12, "initial rank of every q/v update")
    target_r: int = option(8, "average rank per update once the budget has shrunk")
    alpha: float = option(16.0, "lora_alpha; the update is scaled by alpha / ranknum")
    dropout: float = option(0.1, "dropout on the input of the low-rank branch")
    tinit_fraction: float = option(0.1, "warm-up without pruning, as a fraction of the optimizer steps")
    tfinal_fraction: float = option(0.2, "final phase with a fixed rank pattern, as a fraction of the steps")
    delta_t: int = option(10, "steps between budget reallocations")
    beta1: float = option(0.85, "EMA factor of the sensitivity")
    beta2: float = option(0.85, "EMA factor of the uncertainty")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality regulariser added to the loss")

    def __post_init__(self) -> None:
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"need 1 <= target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.tinit_fraction < 0 or self.tfinal_fraction < 0 or self.tinit_fraction + self.tfinal_fraction >= 1:
            raise ValueError(
                "tinit_fraction and tfinal_fraction must be >= 0 and sum to < 1, got "
                f"{self.tinit_fraction} and {self.tfinal_fraction}"
            )
        if self.delta_t < 1:
            raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {self.beta1} and {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight}")


class AdaLoRAClassifier(BackboneClassifier):
    """A peft AdaLoRA ViT with the orthogonality loss and the rank-allocation hook wired to the trainer."""

    net: PeftModel

    def __init__(self, net: PeftModel, orth_reg_weight: float) -> None:
        super().__init__(net)
        self.orth_reg_weight = orth_reg_weight

    def extra_loss(self) -> torch.Tensor | None:
        """orth_reg_weight · R_orth (None when the weight is 0)."""
        if self.orth_reg_weight == 0:
            return None
        return self.orth_reg_weight * adalora_orthogonality(self.net)

    def after_optimizer_step(self, global_step: int) -> None:
        """peft's `update_and_allocate(global_step)`: importance update and masking of pruned ranks."""
        adalora_update_and_allocate(self.net, global_step)


@register_method
class AdaLoRA(Method):
    """Train AdaLoRA's A, E, B on attn.q and attn.v (never k) and the head; the backbone is frozen."""

    key = "adalora"
    rank = 80
    display_name = "AdaLoRA"
    Options = AdaLoRAOptions

    def build(self, ctx: BuildContext) -> AdaLoRAClassifier:
        """The backbone with split qkv, peft AdaLoRA on q and v scheduled over `ctx.total_steps`, trainable head."""
        opts = self.options
        tinit, tfinal = adalora_schedule(ctx.total_steps, opts.tinit_fraction, opts.tfinal_fraction)
        wanted = (round(opts.tinit_fraction * ctx.total_steps), round(opts.tfinal_fraction * ctx.total_steps))
        if (tinit, tfinal) != wanted:
            ctx.log(
                f"adalora: schedule (tinit, tfinal) = {wanted} leaves no budgeting phase in {ctx.total_steps} "
                f"steps; using {(tinit, tfinal)}"
            )
        from peft import AdaLoraConfig  # imported on use: listing methods must not load peft

        config = AdaLoraConfig(
            init_r=opts.init_r,
            target_r=opts.target_r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=opts.delta_t,
            beta1=opts.beta1,
            beta2=opts.beta2,
            orth_reg_weight=opts.orth_reg_weight,
            total_step=ctx.total_steps,
            target_modules=QV_TARGET_REGEX,
            bias="none",
        )
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        return AdaLoRAClassifier(wrap_qv(net, config), opts.orth_reg_weight)
