"""FPT (fine-grained prompt tuning, MICCAI): every LPM block feeds a side block through side-width prompts."""

from __future__ import annotations

import dataclasses

from petlbench.core.method import register_method
from petlbench.core.options import option
from petlbench.fpt.common import SideTuningMethod, SideTuningOptions
from petlbench.fpt.side_network import SidePromptFusion


@dataclasses.dataclass(frozen=True)
class FPTOptions(SideTuningOptions):
    """FPT options: as FPT+ but every LPM block feeds a side block and the side reads 224 px at LPM 512 px."""

    side_layers: int | None = option(None, "side-network depth L_S; unset = every LPM block (FPT's design)")


@register_method
class FPT(SideTuningMethod):
    """FPT: side-width prompts, shared in- and out-projectors, residual after out-proj.

    Same notation as FPT+ (its class docstring); the side network has one block per LPM block by
    default (L_S = L_M) and reads 224 px at LPM 512 px:

        side                                 S = (3p² + 1)·D_s + D_s + T_s·D_s + L_S·b(D_s) + 2·D_s + (D_s + 1)·C
        fusion (prompts, in-proj, out-proj)  F = L_S·P·D_s + (D_s·D + D) + (D·D_s + D_s)
        trainable                              = S + F
        total                                  = S + F + (3p² + 1)·D + D + T·D + L_M·b(D) + 2·D

    ViT-B/16 at 512 px, C = 5: S = 1,435,589, F = 166,752, trainable 1,602,341, total 88,036,901 (1.8201%).
    """

    key = "fpt"
    rank = 90
    display_name = "FPT"
    Options = FPTOptions
    side_res_base = 224
    prompt_fusion = SidePromptFusion
