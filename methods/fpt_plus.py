"""FPT+ (fine-grained prompt tuning plus): a frozen high-resolution LPM feeds a small side ViT via prompts."""

from __future__ import annotations

import dataclasses

from petlbench.core.method import register_method
from petlbench.fpt.common import SideTuningMethod, SideTuningOptions
from petlbench.fpt.side_network import FinePromptFusion

# The papers' Fig. 7 component ablation, adding one component per row: `--opt fpt_plus.KEY=VALUE` sets.
ABLATION_ROWS: dict[str, dict[str, str]] = {
    "side_only": {"use_lpm": "false", "asymmetric": "false"},
    "lpm_mlp": {"fusion": "mlp", "asymmetric": "false", "token_selection": "false", "preload": "false"},
    "fusion_modules": {"asymmetric": "false", "token_selection": "false", "preload": "false"},
    "asymmetric_input": {"token_selection": "false", "preload": "false"},
    "token_selection": {"preload": "false"},
    "preloading": {},
}


@dataclasses.dataclass(frozen=True)
class FPTPlusOptions(SideTuningOptions):
    """FPT+ options: the official configuration (16 prompts, k 8, 6 side layers, 128 px side, 20% tokens)."""


@register_method
class FPTPlus(SideTuningMethod):
    """FPT+: LPM-width prompts, shared LayerNorm and out-projector, top-L_S LPM blocks.

    Trainable = side network + fusion; the LPM (head-less) is frozen but counted in the total.
    With LPM width D, heads H, depth L_M, patch p, MLP ratio r, LPM tokens T = (res/p)² + 1,
    side width D_s = D/k, side depth L_S, side tokens T_s = (side_res/p)² + 1, P prompts, C classes:

        one ViT block of width w       b(w)   = (4 + 2r)·w² + (9 + r)·w
        side                           S      = (3p² + 1)·D_s + D_s + T_s·D_s + L_S·b(D_s) + 2·D_s + (D_s + 1)·C
        fusion (prompts, LN, out-proj) F      = L_S·P·D + 2·D + D·D_s + D_s
        trainable                             = S + F
        total                                 = S + F + (3p² + 1)·D + D + T·D + L_M·b(D) + 2·D

    ViT-B/16 (D 768, H 12, r 4) at 512 px, C = 5: S = 751,877, F = 149,088, trainable 900,965,
    total 87,335,525 (1.0316%). `fusion=mlp` replaces F by 2·D + D·D_s + D_s + D_s² + D_s;
    `use_lpm=false` leaves S alone (trainable = total).
    """

    key = "fpt_plus"
    rank = 100
    display_name = "FPT+"
    Options = FPTPlusOptions
    side_res_base = 128
    prompt_fusion = FinePromptFusion
