"""Per-image statistics of adaptive models, summed over batches and processes."""

from __future__ import annotations

import torch

from tpcrepro import distributed


class StatSum:
    """Sums of an adaptive model's per-image stats ([B] or [B, L] tensors) -> means over images.

    `macs` [B] (each image's own MACs) gives the mean MACs; per-layer counts
    give mean tokens per layer (`n_q`: computed, `n_kv`: keys, `paused`,
    `halted`, `restarted`). Exact under DDP.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.n = 0

    def add(self, stats: dict) -> None:
        per_image = {k: v for k, v in stats.items() if torch.is_tensor(v) and v.dim() >= 1}
        if not per_image:
            return
        self.n += len(next(iter(per_image.values())))
        for k, v in per_image.items():
            v = v.detach().double().sum(0).cpu()
            self.sums[k] = self.sums[k] + v if k in self.sums else v

    def means(self, d: distributed.Dist, prefix: str = "") -> dict:
        if not self.sums:
            return {}
        keys = sorted(self.sums)
        flat = torch.cat([self.sums[k].flatten() for k in keys]).tolist()
        flat = distributed.all_sum(flat + [float(self.n)], d)
        n, out, i = flat[-1], {}, 0
        for k in keys:
            size = self.sums[k].numel()
            vals = [v / n for v in flat[i:i + size]]
            i += size
            name = prefix + ("macs" if k == "macs" else f"tokens_{k}")
            out[name] = vals[0] if self.sums[k].dim() == 0 else vals
        return out
