"""Full fine-tuning: every backbone parameter and the fresh head are trained."""

from __future__ import annotations

from petlbench.backbones.classifier import BackboneClassifier
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, register_method


@register_method
class FullFineTuning(Method):
    """Train the whole ViT; nothing is added or frozen."""

    key = "full_ft"
    rank = 10
    display_name = "Full fine-tuning"

    def build(self, ctx: BuildContext) -> BackboneClassifier:
        """The backbone with a fresh head, all parameters trainable."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        net.requires_grad_(True)
        return BackboneClassifier(net)
