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
        return m._logits(x[:, : m._n_out(x.shape[1])])


def compare_at_macs(model: TPCVisionTransformer, backbone: torch.nn.Module, target_macs: float,
                    p: speed.Protocol, spread: float = 0.5) -> dict:
    """Dense backbone vs the TPC model at a fixed schedule (removed, masked), timed in one run."""
    dims = model.dims
    n_tokens = dims.num_patches + model.num_prefix_tokens
    mean = uniform_count(dims, n_tokens, target_macs, model.kappa)
    counts = schedule(p.batch_size, dims.depth, n_tokens, mean, spread).to(p.device)
    n_final = torch.full((len(counts),), model._n_out(n_tokens), dtype=torch.long)
    macs = flops.mean_vit_macs(dims, counts, kappa=model.kappa, n_final=n_final)
    dense_macs = model.macs_all_tokens() if model.kappa is None else flops.vit_macs(dims, [n_tokens] * dims.depth)
    img = backbone.patch_embed.img_size
    runners = {"dense": backbone, "removed": ScheduleRunner(model, counts, True, model.buckets),
               "removed_padded": ScheduleRunner(model, counts, True, 1), "masked": ScheduleRunner(model, counts, False)}
    pe = model.patch_embed
    res = speed.compare(runners, (getattr(pe, "conv1", pe.proj).in_channels, *img), p)
    return {"benchmark_mode": True, "mean_tokens": mean, "spread": spread, "macs": macs, "dense_macs": dense_macs,
            "macs_ratio": dense_macs / macs, "kappa": model.kappa, "buckets": model.buckets,
            **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("images_per_sec", "ratio")}}


class SwinScheduleRunner(torch.nn.Module):
    """TPC-Swin at a fixed schedule: block l of the TPC stage computes counts[b, l] tokens of image b.

    Which tokens is drawn at random (speed depends on how many); removed runs norm2 + MLP on those
    only (packed over the batch), masked computes every token and keeps the chosen ones.
    """

    def __init__(self, model, counts: torch.Tensor, removed: bool = True, seed: int = 0):
        super().__init__()
        self.model, self.removed = model, removed
        g = torch.Generator().manual_seed(seed)
        b, depth = counts.shape
        rank = torch.rand(depth, b, model.stage_tokens, generator=g).argsort(-1).argsort(-1)  # a random order
        self.register_buffer("masks", rank < counts.t()[..., None])  # [L, B, N]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from tpcrepro.models.swin import block_masked, block_removed

        m = self.model
        x = m.patch_embed(x)
        for i, stage in enumerate(m.layers):
            if i != m.tpc_stage:
                x = stage(x)
                continue
            x = stage.downsample(x)
            for layer, blk in enumerate(stage.blocks):
                mask = self.masks[layer, : len(x)]
                x = block_removed(blk, x, mask) if self.removed else block_masked(blk, x, mask)
        return m.forward_head(m.norm(x))


def compare_swin_at_macs(model, backbone: torch.nn.Module, target_macs: float, p: speed.Protocol,
                         spread: float = 0.5) -> dict:
    """Dense Swin vs TPC-Swin at a fixed stage schedule whose mean MACs hit target_macs, timed in one run."""
    depth = len(model.layers[model.tpc_stage].blocks)
    n = model.stage_tokens
    per_token = sum(model.skip_macs) / depth
    skipped = (model.full_macs - target_macs) / (depth * per_token)
    mean = max(1, min(n, round(n - skipped)))
    counts = schedule(p.batch_size, depth, n, mean, spread).to(p.device)
    macs = model.per_image_macs({"n_q": counts}).double().mean().item()
    runners = {"dense": backbone, "removed": SwinScheduleRunner(model, counts, True),
               "masked": SwinScheduleRunner(model, counts, False)}
    pe = backbone.patch_embed
    res = speed.compare(runners, (pe.proj.in_channels, *pe.img_size), p)
    return {"benchmark_mode": True, "mean_tokens": mean, "spread": spread, "macs": macs,
            "dense_macs": model.full_macs, "macs_ratio": model.full_macs / macs, "kappa": None, "buckets": 0,
            **{f"{k}_{m}": v[m] for k, v in res.items() for m in ("images_per_sec", "ratio")}}


def varlen_efficiency(p: speed.Protocol, lo: int = 60, hi: int = 179, buckets: tuple = (1, 2, 4, 8),
                      model_name: str = "tpc_deit_s") -> dict:
    """Speed of a batch whose images compute lo..hi tokens at every layer against the same batch at their mean.

    Ideal = every image costs what its own count costs, which for a batch is the dense model at the mean
    count (attention's quadratic term aside). Returns images/s of each form and its fraction of the ideal.
    """
    import timm

    torch.manual_seed(0)
    model = timm.create_model(model_name).eval()
    depth, n = model.dims.depth, model.dims.num_patches + model.num_prefix_tokens
    per_image = torch.linspace(lo, hi, p.batch_size).round().long()[torch.randperm(p.batch_size)]
    mean = int(per_image.float().mean().round())
    counts = per_image[:, None].expand(-1, depth).contiguous().to(p.device)
    ideal = torch.full_like(counts, mean)
    runners = {"dense_at_mean": ScheduleRunner(model, ideal, True, 1)}
    for b in buckets:
        runners[f"varlen_{b}_buckets"] = ScheduleRunner(model, counts, True, b)
    pe = model.patch_embed
    res = speed.compare(runners, (pe.proj.in_channels, *pe.img_size), p)
    return {"mean_tokens": mean, "range": [lo, hi], "tokens": n,
            **{f"{k}_images_per_sec": v["images_per_sec"] for k, v in res.items()},
            **{f"{k}_of_ideal": v["ratio"] for k, v in res.items() if k != "dense_at_mean"}}
