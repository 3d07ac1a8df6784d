"""Profile TPC-DeiT-S's removed forward (the real controller) with torch.profiler at batch 1 and 32.

The gate centre β is set by bisection so the removed forward lands at --macs
on a calibration batch (DeiT-S weights as timm initialises them, or --checkpoint
weights are not needed: the cost depends on the counts, not on the values).
Prints the wall time per forward and the top operators by self CPU time.

  OMP_NUM_THREADS=1 python scripts/profile_removed.py --macs 2.8e9 --batches 1 32
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import timm
import torch
from torch.profiler import ProfilerActivity, profile

import tpcrepro.models  # noqa: F401


def mean_macs(model, x: torch.Tensor) -> float:
    out = model.forward_removed(x)
    return float(model.per_image_macs(out["stats"]).double().mean())


def bisect_beta(model, x, target: float, iters: int = 14) -> float:
    lo, hi = -4.0, 12.0  # σ(γ·t − β) on timm's initial DeiT-S weights: all halt early .. none halts
    for _ in range(iters):
        mid = (lo + hi) / 2
        model.tpc = dataclasses.replace(model.tpc, beta=mid)
        lo, hi = (mid, hi) if mean_macs(model, x) < target else (lo, mid)
    model.tpc = dataclasses.replace(model.tpc, beta=(lo + hi) / 2)
    return (lo + hi) / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--macs", type=float, default=2.8e9)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = timm.create_model("deit_small_patch16_224").eval()
    m = timm.create_model("tpc_deit_s").eval()
    m.load_state_dict(bb.state_dict())
    with torch.inference_mode():
        beta = bisect_beta(m, torch.randn(8, 3, 224, 224), args.macs)
        for b in args.batches:
            x = torch.randn(b, 3, 224, 224)
            macs = mean_macs(m, x)
            for f in (m.forward_removed, bb):
                f(x)
            t = {}
            for name, f in (("dense", bb), ("removed", m.forward_removed)):
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    f(x)
                t[name] = (time.perf_counter() - t0) / args.steps
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    m.forward_removed(x)
            print(f"\n== batch {b}: beta {beta:.4f}, {macs / 1e9:.3f} G MACs, dense {t['dense'] * 1e3:.1f} ms, "
                  f"removed {t['removed'] * 1e3:.1f} ms ({t['dense'] / t['removed']:.2f}x), threads {torch.get_num_threads()}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40))


if __name__ == "__main__":
    main()
