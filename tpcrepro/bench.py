"""Benchmark mode: time a fixed per-layer token schedule, without trained weights.

Speed depends on how many tokens each layer computes, not on which. A
schedule fixes, per image and layer, the number of tokens computed (the
first n, CLS included), varying per image around a mean, so the removal
path can be timed at a chosen MACs against the dense backbone and against
the masked form, in one run. Records from here say `benchmark_mode`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import numpy as np
import torch

from tpcrepro import flops, speed
from tpcrepro.errors import UserError
from tpcrepro.models import api
from tpcrepro.models.vit import TPCVisionTransformer, group_overhead, layer_masked, layer_packed_


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
    """A TPC model run at a fixed schedule: tokens removed (gather) or masked (all kept). [B, C, H, W] -> logits.

    counts [B, L]: tokens computed by image b at layer l (the first ones, CLS
    included; 0 once the image has left the batch); kv_counts [B, L] the keys
    (≥ counts; default the same). Everything the controller would decide is
    fixed beforehand, on the host: the ideal removal at these counts.
    """

    def __init__(self, model: TPCVisionTransformer, counts: torch.Tensor, removed: bool = True, buckets: int = 1,
                 kv_counts: Optional[torch.Tensor] = None):
        super().__init__()
        self.model, self.removed, self.buckets = model, removed, buckets
        kv_counts = counts if kv_counts is None else torch.maximum(kv_counts, counts)
        self.register_buffer("counts", counts)
        self.register_buffer("kv_counts", kv_counts)
        self.host = [(c.tolist(), kc.tolist()) for c, kc in zip(counts.t(), kv_counts.t())]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m._embed(x).contiguous()
        pos = np.arange(x.shape[1])[None, :]
        k = m._n_out(x.shape[1])
        overhead = group_overhead(getattr(m, "group_overhead_macs", None), x.device)
        ended, alive = [], list(range(len(x)))
        for i, blk in enumerate(m.blocks):
            nq, nkv = self.host[i]
            if any(nq[j] == 0 for j in alive):  # images that left the batch: their output is kept aside
                ended.append(x[[r for r, j in enumerate(alive) if nq[j] == 0], :k])
                keep = [r for r, j in enumerate(alive) if nq[j] > 0]
                x, alive = x[keep], [alive[r] for r in keep]
                if not alive:
                    break
            computed = pos < np.asarray([nq[j] for j in alive])[:, None]
            kv = pos < np.asarray([nkv[j] for j in alive])[:, None]
            if self.removed:
                x = layer_packed_(blk, x, computed, kv, self.buckets, m.kappa, overhead)
            else:
                x = layer_masked(blk, x, torch.from_numpy(computed).to(x.device), torch.from_numpy(kv).to(x.device),
                                 m.kappa)
        return m._logits(torch.cat([*ended, x[:, :k]]))


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


# ---------------------------------------------------------------- the real controller

@contextmanager
def attributes(model: torch.nn.Module, **values):
    """The model's attributes set to `values` inside the block, restored after it."""
    was = {k: getattr(model, k) for k in values}
    try:
        for k, v in values.items():
            setattr(model, k, v)
        yield model
    finally:
        for k, v in was.items():
            setattr(model, k, v)


def run_form(model: torch.nn.Module, x: torch.Tensor, form: str) -> dict:
    """A TPC model's `removed` or `masked` forward -> {"logits", "stats"} with each image's MACs in stats["macs"]."""
    fn = getattr(model, f"forward_{form}", None)
    if fn is not None:
        out = fn(x)
    else:  # TPC-Swin: the form is a switch of its forward
        with attributes(model, inference=form):
            out = api.stats_forward(model, x)
    stats = out["stats"]
    if "macs" not in stats:
        stats["macs"] = model.per_image_macs(stats)
    return out


def mean_macs(model: torch.nn.Module, x: torch.Tensor, chunk: int = 64) -> float:
    """Mean over the images of x of the removed forward's per-image MACs."""
    with torch.inference_mode():
        return float(torch.cat([run_form(model, c, "removed")["stats"]["macs"] for c in x.split(chunk)]).double().mean())


def set_beta(model: torch.nn.Module, beta: float) -> None:
    model.tpc = replace(model.tpc, beta=float(beta))


def calibrate_beta(model: torch.nn.Module, x: torch.Tensor, target: float, iters: int = 24, rtol: float = 2e-3) -> dict:
    """Set the gate centre β so the removed forward's mean MACs over x land at `target` (bisection).

    MACs grow with β under σ(γ·t − β) and fall with it under σ(γ·t + β). The
    bracket starts at the model's β and widens until it holds the target.
    Returns {"beta", "macs", "steps"}.
    """
    full = model.macs_all_tokens()
    if not 0 < target < full:
        raise UserError(f"--macs {target:.4g} is not below the all-tokens count {full:.4g} of {type(model).__name__}: "
                        "give a smaller target")
    grows = model.tpc.gate_sign == "minus"
    b0 = model.tpc.beta
    cost = lambda b: (set_beta(model, b), mean_macs(model, x))[1]  # noqa: E731
    lo, hi, width = b0, b0, max(1.0, model.tpc.gamma)
    # widen until cost(lo) ≤ target ≤ cost(hi) in the direction MACs grow
    sign = 1.0 if grows else -1.0
    for _ in range(12):
        if cost(lo) <= target:
            break
        lo -= sign * width
        width *= 2
    width = max(1.0, model.tpc.gamma)
    for _ in range(12):
        if cost(hi) >= target:
            break
        hi += sign * width
        width *= 2
    best, steps = (b0, cost(b0)), 0
    for steps in range(1, iters + 1):
        mid = (lo + hi) / 2
        m = cost(mid)
        if abs(m - target) < abs(best[1] - target):
            best = (mid, m)
        if abs(m - target) <= rtol * target:
            break
        lo, hi = (mid, hi) if m < target else (lo, mid)
    set_beta(model, best[0])
    if abs(best[1] - target) > 0.05 * target:
        raise UserError(f"the gates of {type(model).__name__} cannot bring these images to {target:.4g} MACs "
                        f"(β {best[0]:.4g} gives {best[1]:.4g}; every token computed: {full:.4g}): give another --macs")
    return {"beta": best[0], "macs": best[1], "steps": steps}


class Form(torch.nn.Module):
    """A TPC model's removed or masked forward as a module returning logits (for speed.compare).

    overrides: model attributes set for the call only (e.g. group_overhead_macs: the cost-based grouping)."""

    def __init__(self, model: torch.nn.Module, form: str, **overrides):
        super().__init__()
        self.model, self.form, self.overrides = model, form, overrides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits as a user's forward gives them (no MACs computed beside them: that is not inference)."""
        with attributes(self.model, **self.overrides, inference=self.form):
            return self.model(x)

    def run(self, x: torch.Tensor) -> dict:
        with attributes(self.model, **self.overrides):
            return run_form(self.model, x, self.form)


# the published settings of the token-reduction peers timed beside TPC, per backbone: EViT keep 0.7, ToMe r 13
PEERS = {"deit_tiny_patch16_224": ("evit_deit_t", "tome_deit_t"), "deit_small_patch16_224": ("evit_deit_s", "tome_deit_s"),
         "deit_base_patch16_224": ("evit_deit_b", "tome_deit_b"), "vit_smoke_patch2_16": ("evit_vit_smoke", "tome_vit_smoke"),
         "lvvit_s": ("evit_lvvit_s",), "lvvit_smoke": ("evit_lvvit_smoke",)}


def _replay(model: torch.nn.Module, stats: dict) -> torch.nn.Module:
    """The real forward's per-image, per-layer counts replayed with nothing decided at run time."""
    if isinstance(model, api.StageController):  # Swin: n_q per block of the TPC stage
        return SwinScheduleRunner(model, stats["n_q"], True)
    return ScheduleRunner(model, stats["n_q"], True, model.buckets, kv_counts=stats["n_kv"])


class Replays(torch.nn.Module):
    """One replay per timed batch, picked by the batch given (the batches are fixed beforehand)."""

    def __init__(self, model: torch.nn.Module, batches: list[torch.Tensor], stats: list[dict]):
        super().__init__()
        self.runners = torch.nn.ModuleList(_replay(model, st) for st in stats)
        self.which = {x.data_ptr(): i for i, x in enumerate(batches)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runners[self.which[x.data_ptr()]](x)


def compare_real(model: torch.nn.Module, backbone: torch.nn.Module, x: torch.Tensor | list[torch.Tensor],
                 p: speed.Protocol, peers: Optional[dict] = None) -> dict:
    """Time, interleaved in one run on the images x (a batch, or a list of batches timed in turn): the dense
    backbone, the TPC model's removed form (the real controller at its current gates), the same per-image counts
    replayed, the masked form, and the peers.

    Returns every form's images/s and ratio to dense, each one's MACs and MACs ratio, and which form is which.
    """
    batches = [t.to(p.device) for t in (x if isinstance(x, (list, tuple)) else [x])]
    with torch.inference_mode():
        removed = [run_form(model, t, "removed") for t in batches]
        masked = [run_form(model, t, "masked") for t in batches]
    stats = {k: torch.cat([r["stats"][k] for r in removed]) for k in ("macs", "n_q")}
    macs = float(stats["macs"].double().mean())
    dense_macs = float(model.macs_all_tokens())
    runners = {"dense": backbone, "removed": Form(model, "removed"),
               "replayed": Replays(model, batches, [r["stats"] for r in removed]), "masked": Form(model, "masked")}
    forms = {"dense": "the backbone, every token", "removed": "real controller, tokens removed",
             "replayed": "the real forward's per-image counts, fixed beforehand (ideal removal)",
             "masked": "real controller, every token kept in the tensor"}
    extra = {"group_overhead_macs": group_overhead(getattr(model, "group_overhead_macs", None), batches[0].device),
             "timed_images": sum(len(t) for t in batches), "timed_batches": len(batches)}
    runners |= peers or {}
    res = speed.compare(runners, tuple(batches[0].shape[1:]), p, inputs=batches)
    out = {"forms": {**forms, **{k: "published setting, random weights" for k in peers or {}}}, **extra,
           "macs": macs, "dense_macs": dense_macs, "macs_ratio": dense_macs / macs,
           "masked_macs": float(torch.cat([m["stats"]["macs"] for m in masked]).double().mean()),
           "forms_agree": all(bool(torch.allclose(r["logits"], m["logits"], atol=1e-3, rtol=1e-3))
                              for r, m in zip(removed, masked)),
           "tokens_n_q": stats["n_q"].double().mean(0).tolist(), "kappa": getattr(model, "kappa", None),
           "buckets": getattr(model, "buckets", 0)}
    for name, m in (peers or {}).items():
        out[f"{name}_macs"] = float(m.macs())
        out[f"{name}_macs_ratio"] = dense_macs / out[f"{name}_macs"]
    for name, r in res.items():
        out |= {f"{name}_images_per_sec": r["images_per_sec"], f"{name}_ratio": r["ratio"],
                f"{name}_ratio_ci": r["ratio_ci"], f"{name}_ratio_ci_level": r["ratio_ci_level"],
                f"{name}_latency_ms": r["latency_ms"], f"{name}_spread": r["spread"]}
    return out
