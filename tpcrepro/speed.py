"""Throughput by one protocol (docs/measure.md).

Eval mode, inference mode, random input already on the device, warm-up
steps, then timed steps between device syncs (CUDA events on GPU), median
over repeats. Models compared in one call are timed interleaved, repeat by
repeat, so the baseline is re-measured in the same process on the same card
and drift hits all of them alike; a model's ratio is the median of its
per-repeat ratios to the baseline timed beside it, with a distribution-free
interval for that median (order statistics). Never times the data pipeline.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from tpcrepro.records import device_name
from tpcrepro.recipe import ThroughputCfg


@dataclass(frozen=True)
class Protocol(ThroughputCfg):
    """A recipe's `throughput:` settings (batch, precision, warm-up, steps, repeats) and where they run."""

    device: str = "cuda"
    compile: bool = False

    @classmethod
    def of(cls, t: ThroughputCfg, device: str) -> "Protocol":
        """A recipe's throughput settings on a device."""
        return cls(**dataclasses.asdict(t), device=device)

    @classmethod
    def cpu_default(cls, **kw) -> "Protocol":
        """A shorter protocol for a laptop CPU: same steps, smaller numbers."""
        return cls(**{**dict(batch_size=32, precision="fp32", warmup=2, steps=5, repeats=3, device="cpu"), **kw})


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free interval for the median of `values`: (lo, hi, its coverage).

    The k-th smallest and k-th largest values cover the median with probability
    1 − 2·P(Binomial(n, ½) < k); k is the largest with coverage ≥ level. Below
    6 values no k reaches 95 %: the interval is then the range, with its
    (lower) coverage 1 − 2^(1−n) said.
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    cover = lambda k: 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n  # noqa: E731
    k = 1
    while k + 1 <= (n + 1) // 2 and cover(k + 1) >= level:
        k += 1
    return xs[k - 1], xs[n - k], max(0.0, cover(k))


def _autocast(p: Protocol):
    if p.precision == "bf16":
        return torch.autocast(torch.device(p.device).type, dtype=torch.bfloat16)
    return nullcontext()


def _time_steps(model: nn.Module, xs: list[torch.Tensor], p: Protocol) -> float:
    """Seconds per forward, averaged over p.steps forwards of the batches xs in turn, between syncs."""
    if xs[0].is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(p.steps):
            model(xs[i % len(xs)])
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0 / p.steps
    t0 = time.perf_counter()
    for i in range(p.steps):
        model(xs[i % len(xs)])
    return (time.perf_counter() - t0) / p.steps


def compare(models: dict[str, nn.Module], input_shape: tuple, p: Protocol,
            inputs: Optional[torch.Tensor | list[torch.Tensor]] = None) -> dict[str, dict]:
    """Time each model by the protocol; the first one is the baseline of the ratios.

    inputs: the batch to time on (default random of input_shape), or a list of batches of one size that
    every timed repeat walks through in turn (an adaptive controller's cost depends on the images: a trained
    one is timed over many); models whose cost depends on the values are timed on the images they were
    calibrated on.
    """
    prepared = {}
    for name, m in models.items():
        m = m.eval().to(p.device)
        prepared[name] = torch.compile(m) if p.compile else m
    if inputs is None:
        xs = [torch.randn(p.batch_size, *input_shape, device=p.device)]
    else:
        xs = [t.to(p.device) for t in (inputs if isinstance(inputs, (list, tuple)) else [inputs])]
    times: dict[str, list[float]] = {n: [] for n in prepared}
    with torch.inference_mode(), _autocast(p):
        for m in prepared.values():
            for i in range(max(p.warmup, len(xs))):
                m(xs[i % len(xs)])
        if xs[0].is_cuda:
            torch.cuda.synchronize()
        for _ in range(p.repeats):
            for n, m in prepared.items():
                times[n].append(_time_steps(m, xs, p))
    base_ts = times[next(iter(times))]
    out = {}
    b = len(xs[0])
    for n, ts in times.items():
        med = statistics.median(ts)
        paired = [tb / t for tb, t in zip(base_ts, ts)]  # each repeat's ratio to the baseline timed beside it
        lo, hi, cover = median_interval(paired)
        out[n] = {
            "images_per_sec": b / med, "latency_ms": med * 1000.0, "ratio": statistics.median(paired),
            "ratio_ci": [lo, hi], "ratio_ci_level": cover, "repeats": len(ts), "spread": (max(ts) - min(ts)) / med,
        }
    return out


def settings(p: Protocol) -> dict:
    return {**p.__dict__, "device_name": device_name(p.device), "threads": torch.get_num_threads()}
