"""Linear probing: only the fresh head is trained on the frozen backbone's class token."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from petlbench.backbones.classifier import HEAD_PATTERN, BackboneClassifier, freeze_except, name_matcher
from petlbench.backbones.vit import create_backbone
from petlbench.core.method import Batch, BuildContext, Method, register_method


class FrozenTrunkClassifier(BackboneClassifier):
    """A ViT whose trunk runs without autograd; only the head builds a graph (same logits, less memory)."""

    net: VisionTransformer

    def __init__(self, net: VisionTransformer) -> None:
        super().__init__(net)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Logits [B, C]: frozen features under `torch.no_grad()`, then the trainable head."""
        with torch.no_grad():
            features = self.net.forward_features(batch["image"])
        return self.net.forward_head(features)


@register_method
class LinearProbing(Method):
    """Train `head.weight` and `head.bias` only."""

    key = "linear_probe"
    rank = 20
    display_name = "Linear probing"

    def build(self, ctx: BuildContext) -> FrozenTrunkClassifier:
        """The backbone with everything but the fresh head frozen."""
        net = create_backbone(ctx.backbone, ctx.res, ctx.num_classes)
        freeze_except(net, name_matcher([HEAD_PATTERN]))
        return FrozenTrunkClassifier(net)
