"""A-ViT (adaptive tokens, CVPR'22) as a configuration of the TPC controller.

One halting implementation, two configurations: A-ViT is the controller
with one gate h = σ(10·t[0] − centre) (centre 30 for Tiny, 75 for Small), no
token distribution regularizer, no pausing, and its own prior: the mean
halting score per layer (b̂ = 1 at the last layer, normalised) against a
Gaussian N(8, 1) over 12 layers, KL(target ‖ D), weight 1e-3 over 12 layers.
Unlike the released code, tokens are really removed at inference, and the
per-layer mean is over every image (the released code drops the first image
of the batch instead of the CLS token; not reproduced).
"""

from __future__ import annotations

from tpcrepro.models.controller import TPCCfg
from tpcrepro.models.registry import register_family
from tpcrepro.models.vit import TPCVisionTransformer


def avit_cfg(centre: float) -> TPCCfg:
    return TPCCfg(gate_dims=(0, 1), gamma=10.0, beta=centre, single_gate=True, tdr=False, reuse="none",
                  target_depth=8.0, dist_source="break_mean", kl_direction="target_d",
                  phi_p=5e-4, phi_d=1e-3 / 12)


AVIT_T, AVIT_S = avit_cfg(30.0), avit_cfg(75.0)
AVIT_SMOKE = TPCCfg(**{**AVIT_T.__dict__, "beta": 4.0, "target_depth": 5.0})  # the smoke TPC recipes' centre, 0.4

register_family(TPCVisionTransformer, "avit", "A-ViT: one halting gate, no TDR, no pausing", __name__, sizes="ts",
                defaults={"t": {"tpc": AVIT_T}, "s": {"tpc": AVIT_S}}, smoke_defaults={"tpc": AVIT_SMOKE})
