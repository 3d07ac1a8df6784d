"""Benchmark mode: time a fixed per-layer token schedule, without trained weights.

Speed depends on how many tokens each layer computes, not on which. A
schedule fixes, per image and layer, the number of tokens computed (the
first n, CLS included), varying per image around a mean, so the removal
path can be timed at a chosen MACs against the dense backbone and against
the masked form, in one run. Records from here say `benchmark_mode`.
"""

from __future__ import annotations

from typing import Optional

import torch

from tpcrepro import flops, speed
from tpcrepro.models.vit import TPCVisionTransformer, layer_masked, layer_removed


def uniform_count(dims: flops.ViTDims, n_tokens: int, target_macs: float, kappa: Optional[int] = None) -> int:
    """The per-layer token count whose all-layer uniform schedule costs closest to target_macs."""
    cost = lambda n: flops.vit_macs(dims, [n] * dims.depth, kappa=kappa, n_final=1)  # noqa: E731
    return min(range(1, n_tokens + 1), key=lambda n: abs(cost(n) - target_macs))


def schedule(batch: int, depth: int, n_tokens: int, mean: int, spread: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Per-image counts [B, L]: each image draws one count uniformly in mean·(1 ± spread), symmetric, clamped."""
    g = torch.Generator().manual_seed(seed)
    half = int(mean * spread)
    per_image = mean + torch.randint(-half, half + 1, (batch,), generator=g)
    q, r = divmod(int(per_image.sum()) - mean * batch, batch)  # make the batch mean exactly `mean`
    per_image -= q
    per_image[:r] -= 1
    return per_image.clamp(1, n_tokens)[:, None].expand(batch, depth).contiguous()


class ScheduleRunner(torch.nn.Module):
    """A TPC model run at a fixed schedule: tokens removed (gather) or masked (all kept). [B, C, H, W] -> logits."""

    def __init__(self, model: TPCVisionTransformer, counts: torch.Tensor, removed: bool = True, buckets: int = 1):
        super().__init__()
        self.model, self.removed, self.buckets = model, removed, buckets
        self.register_buffer("counts", counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m._embed(x)
        pos = torch.arange(x.shape[1], device=x.device)
        for i, blk in enumerate(m.blocks):
            computed = pos[None, :] < self.counts[: len(x), i : i + 1]
            if self.removed:
                x = layer_removed(blk, x, computed, computed, m.kappa, self.buckets)
            else:
                x = layer_masked(blk, x, computed, computed, m.kappa)
        return m._logits(x[:, :1])


def compare_at_macs(model: TPCVisionTransformer, backbone: torch.nn.Module, target_macs: float,
                    p: speed.Protocol, spread: float = 0.5) -> dict:
    """Dense backbone vs the TPC model at a fixed schedule (removed, masked), timed in one run."""
    dims = model.dims
    n_tokens = dims.num_patches + model.num_prefix_tokens
    mean = uniform_count(dims, n_tokens, target_macs, model.kappa)
    counts = schedule(p.batch_size, dims.depth, n_tokens, mean, spread).to(p.device)
    macs = flops.mean_vit_macs(dims, counts, kappa=model.kappa, n_final=torch.ones(len(counts), dtype=torch.long))
    dense_macs = flops.vit_macs(dims, [n_tokens] * dims.depth)
    img = backbone.patch_embed.img_size
    runners = {"dense": backbone, "removed": ScheduleRunner(model, counts, True, model.buckets),
               "removed_padded": ScheduleRunner(model, counts, True, 1), "masked": ScheduleRunner(model, counts, False)}
    res = speed.compare(runners, (model.patch_embed.proj.in_channels, *img), p)
    return {"benchmark_mode": True, "mean_tokens": mean, "spread": spread, "macs": macs, "dense_macs": dense_macs,
            "macs_ratio": dense_macs / macs, "kappa": model.kappa, "buckets": model.buckets,
            **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("images_per_sec", "ratio")}}
