"""The token-reduction methods tpcrepro knows, as one table; their settings; no torch.

Each entry of METHODS says what the rest of tpcrepro needs of a method: the
name a table row gives (tables/*.yaml `method:`), the model-name prefixes of
its models, the recipe section its constructor takes (a frozen dataclass,
validated by tpcrepro.recipe, with the value ranges checked there), whether
its MACs differ per image (adaptive) or follow a fixed schedule, whether its
stabilizer can be training-only, and its label in the figures. The recipe
sections, the tables' method names, the model constructors' keyword
arguments and the figures' legends are all read from here, so a new method
is one entry (and its settings class) in this file beside its model module.

The settings classes live here, not beside the models, so that recipes and
tables load without importing torch (`tpcrepro list`, `show`, `report`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from tpcrepro.errors import UserError

@dataclass(frozen=True)
class TPCCfg:
    gate_dims: tuple = (0, 1)  # channels of the block output read by the pause and non-restart gates
    gamma: float = 5.0
    beta: float = 40.0
    gate_sign: str = "minus"  # minus: σ(γ·t − β) (A-ViT's convention); plus: σ(γ·t + β) as printed
    single_gate: bool = False  # A-ViT: b = σ(γ·t[gate_dims[0]] ∓ β), no pause gate
    tdr: bool = True
    xi: float = 0.5
    delta: float = 0.01
    reuse: str = "pause"  # pause | none
    pause_span: int = 1
    paused_as_kv: bool = True
    target_depth: float = 8.0  # 1-based layer of the Gaussian prior's mean
    dist_source: str = "halting_weights"  # halting_weights | break_mean
    kl_direction: str = "d_target"  # d_target: KL(D‖target) as printed; target_d: KL(target‖D) as A-ViT
    phi_p: float = 5e-4
    phi_d: float = 0.1

    def __post_init__(self):
        checks = {"gate_sign": ("minus", "plus"), "reuse": ("pause", "none"),
                  "dist_source": ("halting_weights", "break_mean"), "kl_direction": ("d_target", "target_d")}
        for key, allowed in checks.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"tpc.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if len(self.gate_dims) != 2:
            raise ValueError(f"tpc.gate_dims must name two channels, got {self.gate_dims}")
        if not 1 <= self.pause_span <= 100 or not 0.0 <= self.xi <= 1.0 or not 0.0 < self.delta < 1.0:
            raise ValueError(f"tpc needs 1 ≤ pause_span ≤ 100, 0 ≤ xi ≤ 1 and 0 < delta < 1; got "
                             f"{self.pause_span}, {self.xi}, {self.delta}")


@dataclass(frozen=True)
class EViTCfg:
    keep_rate: float = 0.7
    locations: tuple = (3, 6, 9)  # 0-based blocks that prune
    fuse: bool = True  # fuse the dropped tokens into one
    shrink_start: int = 0  # epoch at which the keep rate starts to fall from 1 (EViT from scratch: 10)
    shrink_epochs: int = 0  # epochs of the cosine fall to keep_rate (EViT from scratch: 100); 0 = fixed

    def __post_init__(self):
        if not 0.0 < self.keep_rate <= 1.0:
            raise ValueError(f"evit.keep_rate must be in (0, 1], got {self.keep_rate}")

    def keep_rate_at(self, epoch: int) -> float:
        if not self.shrink_epochs or epoch >= self.shrink_start + self.shrink_epochs:
            return self.keep_rate if epoch >= self.shrink_start else 1.0
        if epoch < self.shrink_start:
            return 1.0
        t = (epoch - self.shrink_start) / self.shrink_epochs
        return self.keep_rate + (1.0 - self.keep_rate) * (math.cos(math.pi * t) + 1) / 2


@dataclass(frozen=True)
class DynamicViTCfg:
    keep_rate: float = 0.7  # per stage: cumulative ρ, ρ², ρ³
    locations: tuple = (3, 6, 9)
    ratio_weight: float = 2.0  # DeiT-S and LV-ViT; 5 for DeiT-B
    cls_distill_weight: float = 0.5
    token_distill_weight: float = 0.5
    backbone_lr_scale: float = 0.01
    freeze_epochs: int = 5
    tau: float = 1.0  # Gumbel-softmax temperature


@dataclass(frozen=True)
class ToMeCfg:
    r: int = 13  # pairs merged in every block
    schedule: tuple = ()  # per-block r (overrides r), e.g. ToMe's decreasing schedules

    def r_at(self, block: int) -> int:
        return self.schedule[block] if self.schedule else self.r


# (low, high, low_open, high_open); None = unbounded: the value ranges tpcrepro.recipe checks per key
GE0, GE1, GT0, UNIT = (0, None, False, False), (1, None, False, False), (0, None, True, False), (0, 1, False, False)


@dataclass(frozen=True)
class Method:
    """One method: how tables name it, which models are its, what settings they take."""

    name: str  # a table row's `method:`
    label: str  # its legend in the figures (the knob its rows sweep)
    prefixes: tuple = ()  # model names that start with one of these are this method's (none: any other model)
    section: Optional[str] = None  # the recipe section passed to its models' constructors as that keyword
    cfg: Optional[type] = None  # the section's settings class
    ranges: dict = field(default_factory=dict)  # key -> (low, high, low_open, high_open) of the section
    adaptive: bool = False  # per-image token counts, hence per-image MACs (else a fixed schedule or none)
    train_only: bool = False  # its stabilizer can be on in training and off at inference (stabilizer.train_only)
    train_only_except: tuple = ()  # model-name prefixes of its models that cannot


TPC_RANGES = {"xi": UNIT, "delta": (0, 1, True, True), "pause_span": GE1, "target_depth": GT0, "phi_p": GE0, "phi_d": GE0}

METHODS: tuple[Method, ...] = (
    Method("baseline", "backbone"),
    Method("tpc", "TPC (target depth)", ("tpc_",), "tpc", TPCCfg, TPC_RANGES, adaptive=True, train_only=True,
           train_only_except=("tpc_swin",)),
    Method("avit", "A-ViT (target depth)", ("avit_",), "tpc", TPCCfg, TPC_RANGES, adaptive=True, train_only=True),
    Method("evit", "EViT (keep rate)", ("evit_",), "evit", EViTCfg,
           {"keep_rate": (0, 1, True, False), "shrink_start": GE0, "shrink_epochs": GE0}),
    Method("dynamicvit", "DynamicViT (keep ratio)", ("dynamicvit_",), "dynamicvit", DynamicViTCfg,
           {"keep_rate": (0, 1, True, False), "ratio_weight": GE0, "cls_distill_weight": GE0,
            "token_distill_weight": GE0, "backbone_lr_scale": GE0, "freeze_epochs": GE0, "tau": GT0}),
    Method("tome", "ToMe (r)", ("tome_",), "tome", ToMeCfg, {"r": GE0}),
)


def names() -> tuple[str, ...]:
    return tuple(m.name for m in METHODS)


def get(name: str) -> Method:
    for m in METHODS:
        if m.name == name:
            return m
    raise KeyError(name)


def label(name: str) -> str:
    """The figure legend of a table row's method (the name itself for anything else)."""
    return next((m.label for m in METHODS if m.name == name), name)


def sections() -> dict[str, type]:
    """Recipe section -> its settings class, in table order (a section two methods share appears once)."""
    out: dict[str, type] = {}
    for m in METHODS:
        if m.section:
            out.setdefault(m.section, m.cfg)
    return out


def ranges() -> dict[type, dict]:
    """Settings class -> the value ranges of its keys."""
    return {m.cfg: m.ranges for m in METHODS if m.cfg}


def of_model(model_name: str) -> Optional[Method]:
    """The method whose models a timm name belongs to (its first matching prefix); None for a plain backbone."""
    for m in METHODS:
        if any(model_name.startswith(p) for p in m.prefixes):
            return m
    return None


def method_kwargs(recipe: Any) -> dict:
    """The keyword arguments a recipe's model takes from the recipe: its method's section and the stabilizer."""
    name, stab = recipe.model.name, recipe.stabilizer
    m = of_model(name)
    if m is None or m.section is None:
        if stab.kappa is not None:
            raise UserError(f"stabilizer.kappa is set but {name} has no stabilizer; remove the key")
        return {}
    out = {m.section: getattr(recipe, m.section), "kappa": stab.kappa}
    if stab.train_only:
        if not m.train_only or any(name.startswith(p) for p in m.train_only_except):
            raise UserError(f"stabilizer.train_only is not supported by {name}; remove the key")
        out["kappa_train_only"] = True
    return out
