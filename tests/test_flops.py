"""MACs: fvcore against the reference counts, and the analytic counter against fvcore."""

from __future__ import annotations

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401
from tpcrepro import flops
from tpcrepro.measure import static_flops
from tpcrepro.models.schedule import ScheduledViT

REFERENCE = {  # params, MACs at 224 px, fused attention off
    "deit_tiny_patch16_224": (5.717e6, 1.258e9),
    "deit_small_patch16_224": (22.051e6, 4.608e9),
    "deit_base_patch16_224": (86.568e6, 17.583e9),
    "swin_tiny_patch4_window7_224": (28.288e6, 4.509e9),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_fvcore_matches_reference(name):
    out = static_flops(name)
    params, macs = REFERENCE[name]
    assert abs(out["macs"] / macs - 1) < 0.005, out
    assert abs(out["params"] / params - 1) < 0.005, out
    if "analytic_macs" in out:
        assert out["analytic_macs"] == out["macs"]


def test_fused_attention_would_hide_the_matmuls():
    m = timm.create_model("deit_tiny_patch16_224")
    from fvcore.nn import FlopCountAnalysis

    fused = FlopCountAnalysis(m.eval(), torch.zeros(1, 3, 224, 224)).unsupported_ops_warnings(False).total()
    assert fused < flops.fvcore_macs(m, (3, 224, 224))  # why counting switches fused attention off


def _tiny_vit():
    return timm.create_model("vit_smoke_patch2_16", num_classes=10, in_chans=1, img_size=16).eval()


@pytest.mark.parametrize("keep", [[65] * 8, [65, 65, 50, 50, 40, 30, 20, 10], [65, 40, 40, 40, 3, 3, 2, 1]])
def test_analytic_equals_fvcore_with_tokens_removed(keep):
    vit = _tiny_vit()
    dims = flops.ViTDims.of(vit)
    assert flops.vit_macs(dims, keep) == flops.fvcore_macs(ScheduledViT(vit, keep), (1, 16, 16))


def test_analytic_deit_s_schedule_equals_fvcore():
    vit = timm.create_model("deit_small_patch16_224").eval()
    keep = [197] * 3 + [140] * 3 + [100] * 3 + [72] * 3  # EViT's keep-0.7 counts
    assert flops.vit_macs(flops.ViTDims.of(vit), keep) == flops.fvcore_macs(ScheduledViT(vit, keep), (3, 224, 224))


def test_mean_over_images_is_not_the_count_at_the_mean():
    dims = flops.ViTDims.of(_tiny_vit())
    n = torch.tensor([[65] * 8, [5] * 8])
    per_image = [flops.vit_macs(dims, r.tolist()) for r in n]
    assert flops.mean_vit_macs(dims, n) == pytest.approx(sum(per_image) / 2)
    assert flops.mean_vit_macs(dims, n) > flops.vit_macs(dims, [35] * 8)  # attention is quadratic


def test_block_counts_kv_kappa_and_queries():
    c, h = 64, 256
    dense = flops.block_macs(10, 10, c, h)
    assert dense == (4 + 2 * 4) * 10 * c * c + 2 * 100 * c + 10 * 10 * c
    assert flops.block_macs(10, 10, c, h, kappa=10) == dense  # kappa >= keys: dense
    assert flops.block_macs(10, 10, c, h, kappa=4) == dense - 10 * 6 * c  # sparse A·V
    assert flops.block_macs(5, 10, c, h) < dense  # fewer queries
