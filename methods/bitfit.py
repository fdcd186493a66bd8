"""BitFit: every bias term (LayerNorm biases included) plus the fresh head is trained."""

from __future__ import annotations

from petlbench.backbones.classifier import HEAD_PATTERN, BackboneClassifier, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import BuildContext, Method, register_method

BIAS_PATTERN = r"(.+\.)?bias"


@register_method
class BitFit(Method):
    """Train all parameters named `*bias` and the head; weights, `cls_token` and `pos_embed` stay frozen."""

    key = "bitfit"
    rank = 60
    display_name = "BitFit"

    def build(self, ctx: BuildContext) -> BackboneClassifier:
        """The backbone with only biases and the head trainable."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        freeze_except(net, name_matcher([BIAS_PATTERN, HEAD_PATTERN]))
        return BackboneClassifier(net)
