"""Building a method's model for a run: the one place the run's attention kernel is applied."""

from __future__ import annotations

from petlbench.backbones.attention import set_attention
from petlbench.core.method import BuildContext, Method, PetlModel


def build_model(method: Method, ctx: BuildContext) -> PetlModel:
    """`method.build(ctx)` with `ctx.attention` applied to every attention module of the model."""
    model = method.build(ctx)
    set_attention(model, ctx.attention)
    return model
