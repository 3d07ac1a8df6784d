"""The stabilizer's cost on one ViT block: dense timm Block vs the same block with top-κ attention.

Both run in one process on the same weights and input, interleaved, timed
between device syncs, median over repeats (docs/measure.md). Ratios are
stabilizer / dense: the design goal is ≤ 1.3 for a DeiT-S block (κ = 100,
197 tokens, batch 256, bf16).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from tpcrepro.models.stabilizer import attention, backend
from tpcrepro.models.vit import block_forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fns: dict[str, Callable[[], object]], device: torch.device, iters: int, repeats: int,
               warmup: int) -> dict[str, float]:
    """Milliseconds per call of each fn: `iters` calls between syncs, repeats interleaved across fns, median."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3 / iters)
    return {name: statistics.median(ts) for name, ts in times.items()}


def stabilizer_block_bench(batch: int = 256, tokens: int = 197, dim: int = 384, heads: int = 6, kappa: int = 100,
                           dtype: torch.dtype = torch.bfloat16, device: str = "cuda", iters: int = 20,
                           repeats: int = 5, warmup: int = 5, seed: int = 0) -> dict:
    """Times (ms) and ratios (stabilizer / dense) for one block, inference (no_grad) and a training step
    (forward + backward to the weights and input), plus the attention core alone ([B, H, N, D] q, k, v).

    The block and input are cast to `dtype`; the stabilizer runs `block_forward(blk, x, None, None, kappa)`,
    its attention by `backend(device)` (TPCREPRO_STABILIZER).
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    blk = Block(dim, heads).to(dev, dtype)
    x = torch.randn(batch, tokens, dim, device=dev, dtype=dtype)
    grad = torch.randn_like(x)
    q, k, v = torch.randn(3, batch, heads, tokens, dim // heads, device=dev, dtype=dtype).unbind(0)

    def step(fwd: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        xg = x.detach().requires_grad_()

        def run() -> None:
            blk.zero_grad(set_to_none=True)
            fwd(xg).backward(grad)
        return run

    def stab(t: torch.Tensor) -> torch.Tensor:
        return block_forward(blk, t, None, None, kappa)

    blk.eval()
    with torch.no_grad():
        core = _median_ms({"dense": lambda: F.scaled_dot_product_attention(q, k, v),
                           "stabilizer": lambda: attention(q, k, v, kappa=kappa)}, dev, iters, repeats, warmup)
        infer = _median_ms({"dense": lambda: blk(x), "stabilizer": lambda: stab(x)}, dev, iters, repeats, warmup)
    blk.train()
    train = _median_ms({"dense": step(blk), "stabilizer": step(stab)}, dev, iters, repeats, warmup)
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "backend": backend(dev),
           "batch": batch, "tokens": tokens, "dim": dim, "heads": heads, "kappa": kappa, "dtype": str(dtype)}
    for name, t in (("core", core), ("infer", infer), ("train", train)):
        out |= {f"{name}_dense_ms": t["dense"], f"{name}_stabilizer_ms": t["stabilizer"],
                f"{name}_ratio": t["stabilizer"] / t["dense"]}
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(stabilizer_block_bench(), indent=1))
