"""Profile a TPC model's removed forward (the real controller) with torch.profiler, beside its dense backbone.

The model is built as `tpcrepro bench` builds it: the backbone's initial
weights with the gate centre β bisected so the removed forward lands at
--macs on each profiled batch (the cost depends on the counts, not on the
values), or a trained run's weights and gates on its validation images (--run). Prints the wall time
per forward of dense and removed, the mean tokens per layer, and the top
operators by self CPU time; with --parts also the wall time per forward of
each part of the removed form (the packed blocks, the controller's step and
plan, the gate channels, the output sum, the embedding, the head) and of the
dense backbone's blocks.

  OMP_NUM_THREADS=2 python scripts/profile_removed.py --model tpc_deit_s --macs 2.8e9 --batches 1 32
  OMP_NUM_THREADS=2 python scripts/profile_removed.py --run smoke/tpc --batches 1 32 --buckets 1 4
  OMP_NUM_THREADS=2 python scripts/profile_removed.py --run smoke/tpc --batches 1 --steps 200 --parts --no-table
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile

from tpcrepro import bench, benchreal
from tpcrepro.models import controller, host_controller, vit


@contextmanager
def timed_parts(model: torch.nn.Module, backbone: torch.nn.Module):
    """{part: [seconds, calls]} filled while inside: the removed form's parts (wrapped where forward_removed
    looks them up) and the dense backbone's blocks (forward hooks)."""
    spent: dict = defaultdict(lambda: [0.0, 0])
    wrapped = [(vit, "layer_packed_", "packed blocks"), (host_controller, "plan", "controller: plan"),
               (host_controller, "decide", "controller: step"), (controller, "gate_channels", "gate channels"),
               (host_controller.OutputSum, "add", "output sum"), (model, "_embed", "embedding"),
               (model, "_outputs", "norm and head")]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in wrapped]

    def timer(fn, part):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[part][0] += time.perf_counter() - t0
                spent[part][1] += 1
        return run

    for owner, name, part in wrapped:
        setattr(owner, name, timer(getattr(owner, name), part))
    started = [0.0]

    def start(module, args):
        started[0] = time.perf_counter()

    def stop(module, args, out):
        spent["dense blocks"][0] += time.perf_counter() - started[0]
        spent["dense blocks"][1] += 1

    hooks = [h for blk in backbone.blocks
             for h in (blk.register_forward_pre_hook(start), blk.register_forward_hook(stop))]
    try:
        yield spent
    finally:
        for h in hooks:
            h.remove()
        for owner, name, fn in saved:
            if fn is None:  # an attribute looked up on the class (a bound method): drop the instance's wrapper
                delattr(owner, name)
            else:
                setattr(owner, name, fn)


def print_parts(model, backbone, x: torch.Tensor, steps: int) -> None:
    """Wall time per forward of each part of the removed form, and of the dense backbone's blocks."""
    with timed_parts(model, backbone) as spent:
        for _ in range(steps):
            model.forward_removed(x)
        for _ in range(steps):
            backbone(x)
    for part, (secs, calls) in spent.items():
        print(f"  {part:18s} {secs / steps * 1e3:8.3f} ms a forward, {calls / steps:5.1f} calls "
              f"({secs / max(calls, 1) * 1e6:7.1f} µs a call)")


def wall(f, x: torch.Tensor, steps: int) -> float:
    f(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        f(x)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tpc_deit_s")
    ap.add_argument("--run", default=None, help="a trained run's recipe (seed 0), e.g. smoke/tpc")
    ap.add_argument("--macs", type=float, default=None, help="default: 2.8e9 without --run, the trained gates with it")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--buckets", type=int, nargs="+", default=None, help="the removed form's groups (default: the model's)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-table", action="store_true", help="wall times only")
    ap.add_argument("--parts", action="store_true", help="the wall time of each part of the removed form")
    args = ap.parse_args()
    macs = args.macs if args.macs is not None or args.run else 2.8e9
    model, backbone, _, source = benchreal.build(args.model, None, None, args.run)
    shape = (benchreal._args(model)["in_chans"], *backbone.patch_embed.img_size)
    print(f"{args.run or args.model}: {source}; threads {torch.get_num_threads()}")
    with torch.inference_mode():
        for b in args.batches:
            x = benchreal.timed_batches(b, args.run, shape)[0]  # a run: its first validation images; else random
            if macs is not None:
                bench.calibrate_beta(model, x, macs)
            stats = model.forward_removed(x)["stats"]
            got = float(model.per_image_macs(stats).double().mean())
            tokens = " ".join(f"{v:.0f}" for v in stats["n_q"].double().mean(0).tolist())
            dense = wall(backbone, x, args.steps)
            for nb in args.buckets or [model.buckets]:
                model.buckets = nb
                t = wall(model.forward_removed, x, args.steps)
                print(f"\n== batch {b}, buckets {nb}: beta {model.tpc.beta:.4f}, {got / 1e6:.2f} M MACs "
                      f"(dense {model.macs_all_tokens() / 1e6:.2f} M), tokens {tokens}; dense {dense * 1e3:.2f} ms, "
                      f"removed {t * 1e3:.2f} ms ({dense / t:.2f}x)")
                if args.parts:
                    print_parts(model, backbone, x, args.steps)
                if args.no_table:
                    continue
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.steps):
                        model.forward_removed(x)
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top,
                                                max_name_column_width=40))


if __name__ == "__main__":
    main()
