"""The hooks tpcrepro's trainer and measuring code use on a model, written down once.

Every model is a plain timm model: `forward(x)` returns logits [B, classes]
(in training too), `forward_features`/`forward_head` as timm's ViT/Swin. A
model whose forward has more to report (token counts, per-image MACs, its
own loss terms) says so through one explicit method, `forward_with_stats`;
the other hooks are optional and named here. Code that needs one of them
asks through the helpers below (`is_adaptive`, `stats_forward`, ...), never
by probing attributes of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from tpcrepro.flops import ViTDims


@runtime_checkable
class WithStats(Protocol):
    """A model with statistics and/or loss terms of its own (TPC, A-ViT, DynamicViT, the TPC integrations)."""

    def forward_with_stats(self, x: torch.Tensor) -> dict:
        """{"logits": [B, classes], "stats": {name: [B, ...] tensors, "macs": [B] if adaptive},
        "losses": {name: scalar, already weighted} (training only)}."""


@runtime_checkable
class Adaptive(WithStats, Protocol):
    """Per-image token counts, hence per-image MACs (the token controllers)."""

    def per_image_macs(self, stats: dict) -> torch.Tensor:
        """Each image's MACs [B] from the stats of forward_with_stats."""

    def macs_all_tokens(self) -> int:
        """MACs of one image when every token is computed (the backbone's count)."""

    def gate_report(self, x: torch.Tensor) -> dict:
        """{"max_break", "gate_channel_max", "centre"}: can the controller learn from these weights?"""


@runtime_checkable
class ViTController(Protocol):
    """A token controller on a plain stack of ViT blocks (TPC on DeiT and LV-ViT, A-ViT): what the analytic
    count and a fixed per-layer schedule (benchmark mode, replayed counts) need of it."""

    @property
    def dims(self) -> "ViTDims": ...  # widths, depth and patches of the stack (tpcrepro.flops)

    num_prefix_tokens: int
    kappa: Optional[int]  # the stabilizer's top-κ, None for dense attention
    buckets: int  # removed form: images grouped by token count, padded per group


@runtime_checkable
class StageController(Protocol):
    """A token controller inside one stage of a hierarchical backbone (TPC-Swin)."""

    @property
    def stage_tokens(self) -> int: ...  # tokens of the stage the controller runs in


@runtime_checkable
class FixedSchedule(Protocol):
    """A method whose token counts are the same for every image: it counts its own MACs exactly."""

    def macs(self) -> int: ...


@runtime_checkable
class EpochScheduled(Protocol):
    """A method with a schedule over epochs (EViT's keep-rate warm-up)."""

    def set_epoch(self, epoch: int) -> None: ...


@runtime_checkable
class GroupedLR(Protocol):
    """Named parameter groups with their own learning-rate scale per epoch (DynamicViT)."""

    def optimizer_groups(self) -> dict[str, list]: ...

    def lr_scale(self, group: str, epoch: int) -> float: ...


@runtime_checkable
class Distilled(Protocol):
    """Distils from a frozen copy of its starting weights (DynamicViT)."""

    def attach_teacher(self) -> None: ...


@runtime_checkable
class TokenLabeled(Protocol):
    """LV-ViT's token-labeling outputs: head(CLS) and the aux head per patch token, MixToken's box unmixed."""

    def forward_token_labels(self, x: torch.Tensor, box: Optional[tuple] = None) -> dict:
        """{"logits": [B, classes], "aux_tokens": [B, N, classes], "stats"/"losses" as forward_with_stats}."""


def is_adaptive(model: nn.Module) -> bool:
    """Models whose MACs differ per image (reported as a mean over evaluation images)."""
    return isinstance(model, Adaptive)


def stats_forward(model: nn.Module, x: torch.Tensor) -> dict:
    """{"logits", "stats", "losses"} of any model: forward_with_stats where it has one, else its logits alone."""
    out = model.forward_with_stats(x) if isinstance(model, WithStats) else {"logits": model(x)}
    return {"stats": {}, "losses": {}, **out}


def token_label_forward(model: nn.Module, x: torch.Tensor, box: Optional[tuple]) -> dict:
    """forward_token_labels, with "stats" and "losses" always present."""
    return {"stats": {}, "losses": {}, **model.forward_token_labels(x, box)}


class StatsForward(nn.Module):
    """`stats_forward` (or, token_labels=True, `token_label_forward`) as a module's forward.

    The trainer wraps this, not the model, in DistributedDataParallel: DDP sees
    every forward through its __call__ (gradient hooks), while the model's own
    forward stays timm's.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, box: Optional[tuple] = None, token_labels: bool = False) -> dict:
        if token_labels:
            return token_label_forward(self.model, x, box)
        return stats_forward(self.model, x)
