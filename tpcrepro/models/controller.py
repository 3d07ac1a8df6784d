"""The token propagation controller (TPC) and A-ViT's halting, as pure tensor functions.

Per image, K tokens; per token: remainder R (starts 1), ponder cost ρ,
`halted`, and `pause_left` (layers it still skips). After each block:
gates p, r̃ from two channels of the block output (Eq. 4-5), break b = p·r̃,
the token distribution regularizer b̂ = ξ·b + (1 − ξ)·mean(b) (Eq. 9), then
adaptive computation time on b̂ (Eq. 6-8): a token halts once Σ b̂ ≥ 1 − δ,
its halting weights are b̂ before and the remainder at the halting layer. A
running token with p ≥ ½ and r = 1 − r̃ ≥ ½ pauses for `pause_span` layers
and then restarts (reuse: pause); reuse: none never pauses (Algorithm 1).
CLS takes part in halting but never pauses. A-ViT is the same controller
with one gate (b = σ(γ·t₀ − β)), no TDR and no pausing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tpcrepro.methods import TPCCfg  # noqa: F401  (its settings: torch-free, for recipes)


@dataclass
class TokenState:
    """[B, N] per-token state."""

    R: torch.Tensor  # remainder 1 − Σ b̂ (float)
    rho: torch.Tensor  # ponder cost so far (float)
    halted: torch.Tensor  # bool
    pause_left: torch.Tensor  # layers still to skip (int)

    @classmethod
    def start(cls, b: int, n: int, device) -> "TokenState":
        return cls(torch.ones(b, n, device=device), torch.zeros(b, n, device=device),
                   torch.zeros(b, n, dtype=torch.bool, device=device),
                   torch.zeros(b, n, dtype=torch.long, device=device))

    def computed(self) -> torch.Tensor:
        return ~self.halted & (self.pause_left == 0)

    def paused(self) -> torch.Tensor:
        return ~self.halted & (self.pause_left > 0)

    def index(self, keep: torch.Tensor) -> "TokenState":
        return TokenState(self.R[keep], self.rho[keep], self.halted[keep], self.pause_left[keep])


def gates(t: torch.Tensor, cfg: TPCCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Pause p and non-restart r̃ from the block output t [B, N, C] -> ([B, N], [B, N]).

    With single_gate (A-ViT), r̃ ≡ 1 so b = p. Both gates in one sigmoid when their channels are adjacent.
    """
    sign = -1.0 if cfg.gate_sign == "minus" else 1.0
    i, j = cfg.gate_dims
    f32 = (lambda v: v) if t.dtype == torch.float32 else (lambda v: v.float())  # noqa: E731  (no op when fp32)
    if cfg.single_gate:
        p = torch.sigmoid(cfg.gamma * f32(t[..., i]) + sign * cfg.beta)
        return p, torch.ones_like(p)
    both = t[..., i : i + 2] if j == i + 1 else t[..., [i, j]]
    g = torch.sigmoid(cfg.gamma * f32(both) + sign * cfg.beta)
    return g[..., 0], g[..., 1]


def regularize(b: torch.Tensor, computed: torch.Tensor, cfg: TPCCfg) -> torch.Tensor:
    """TDR (Eq. 9): mix each token's b with the mean b of the tokens computed in its image. [B, N]."""
    if not cfg.tdr or cfg.xi == 1.0:
        return b
    m = computed.float()
    mean = (b * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_(min=1.0)
    return torch.lerp(mean, b, cfg.xi)  # ξ·b + (1 − ξ)·mean


def step(state: TokenState, b_hat: torch.Tensor, p: torch.Tensor, r_tilde: torch.Tensor, computed: torch.Tensor,
         last: bool, is_cls: torch.Tensor, cfg: TPCCfg) -> tuple[TokenState, torch.Tensor, torch.Tensor]:
    """One layer of halting and pausing for the tokens `computed` there. All [B, N].

    Returns the new state, the halting weights w of this layer, and the mask
    of tokens that halted here. The halting mask is hard (no gradient);
    gradients flow through b̂ into w, R and ρ.
    """
    cf = computed.float()
    rem = state.R - b_hat
    halt = computed if last else computed & (rem.detach() <= cfg.delta)
    running = computed ^ halt  # computed and not halted (halt ⊆ computed)
    w = torch.where(halt, state.R, b_hat) * cf
    R = torch.where(running, rem, state.R)
    rho = state.rho + torch.where(halt, state.R + 1.0, cf)  # one per layer computed, plus the remainder at halting
    # paused tokens count down (a token with layers left to skip is never halted: pauses start on running tokens)
    pause_left = (state.pause_left - 1).clamp_(min=0)
    if cfg.reuse == "pause" and not last:
        new = running & ~is_cls & (p.detach() >= 0.5) & (r_tilde.detach() <= 0.5)
        pause_left = pause_left.masked_fill_(new, cfg.pause_span)
    return TokenState(R, rho, state.halted | halt, pause_left), w, halt


def decide(state: TokenState, t: torch.Tensor, computed: torch.Tensor, last: bool, is_cls: torch.Tensor,
           cfg: TPCCfg) -> tuple[TokenState, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """After a block with output t [B, N, C]: gates, TDR (b̂ = 1 at the last layer), then `step`.

    Returns (state, halting weights w, halted here, break b, regularized b̂), all [B, N].
    """
    p, r_tilde = gates(t, cfg)
    b = p * r_tilde
    b_hat = torch.ones_like(b) if last else regularize(b, computed, cfg)
    state, w, halt = step(state, b_hat, p, r_tilde, computed, last, is_cls, cfg)
    return state, w, halt, b, b_hat


def decide_removed(state: TokenState, t: torch.Tensor, computed: torch.Tensor, n_computed: torch.Tensor, last: bool,
                   may_pause: torch.Tensor, cfg: TPCCfg) -> tuple[TokenState, torch.Tensor, torch.Tensor]:
    """`decide` for inference, in fewer tensor ops (the removed form's per-layer cost at small batch sizes).

    The same values as `decide`: the same gates, TDR, halting and pausing, the same halting weights, but no
    ponder cost (ρ stays as it is: it feeds only the training losses), no breaks returned, and what the caller
    has already counted passed in: n_computed [B, 1] (computed tokens per image), may_pause [B, N] (not CLS).
    Returns (state, halting weights w, halted here).
    """
    if last:  # b̂ = 1: every computed token halts with its remainder
        halt = computed
        w = torch.where(computed, state.R, 0.0)
        return TokenState(state.R, state.rho, state.halted | halt, (state.pause_left - 1).clamp_(min=0)), w, halt
    p, r_tilde = gates(t, cfg)
    b = p * r_tilde
    if cfg.tdr and cfg.xi != 1.0:  # Eq. 9 with the mean over the image's computed tokens
        mean = torch.where(computed, b, 0.0).sum(1, keepdim=True) / n_computed.clamp(min=1)
        b = torch.lerp(mean, b, cfg.xi)
    rem = state.R - b
    halt = computed & (rem <= cfg.delta)
    running = computed ^ halt
    w = torch.where(halt, state.R, torch.where(computed, b, 0.0))
    R = torch.where(running, rem, state.R)
    pause_left = (state.pause_left - 1).clamp_(min=0)
    if cfg.reuse == "pause":
        pause_left = pause_left.masked_fill_(running & may_pause & (p >= 0.5) & (r_tilde <= 0.5), cfg.pause_span)
    return TokenState(R, state.rho, state.halted | halt, pause_left), w, halt


def finish(state: TokenState, images: torch.Tensor | None = None) -> tuple[TokenState, torch.Tensor]:
    """Tokens not yet halted halt here with their remainder: (state, w_end).

    After the last layer (images None: all) these are the paused ones; with
    images [B] bool, only those images' tokens (an image whose CLS halted).
    """
    left = ~state.halted if images is None else ~state.halted & images[:, None]
    w_end = state.R * left.float()
    pause_left = state.pause_left.masked_fill(left, 0)
    return TokenState(state.R, state.rho + w_end, state.halted | left, pause_left), w_end


# ---------------------------------------------------------------- losses

def gaussian_prior(depth: int, mean: float, std: float = 1.0, device=None) -> torch.Tensor:
    """N(mean, std) over layers 1..depth, normalised to sum 1. [L]."""
    layers = torch.arange(1, depth + 1, dtype=torch.float32, device=device)
    pdf = torch.exp(-0.5 * ((layers - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
    return pdf / pdf.sum()


def depth_distribution(weights: torch.Tensor, b_hat: torch.Tensor, computed: torch.Tensor, cfg: TPCCfg) -> torch.Tensor:
    """D over layers [L]. weights, b_hat, computed: [B, L, N].

    halting_weights: D_l = mean over images and tokens of w^l (sums to 1).
    break_mean: mean b̂ of the tokens computed at l (b̂ = 1 at the last layer), normalised.
    """
    if cfg.dist_source == "halting_weights":
        return weights.mean(dim=(0, 2))
    m = computed.float()
    d = (b_hat * m).sum(dim=(0, 2)) / m.sum(dim=(0, 2)).clamp(min=1.0)
    return d / d.sum().clamp(min=1e-8)


def kl_to_prior(d: torch.Tensor, prior: torch.Tensor, cfg: TPCCfg) -> torch.Tensor:
    log_d = torch.log(d + 1e-8)
    if cfg.kl_direction == "d_target":
        return (d * (log_d - torch.log(prior))).sum()
    return (prior * (torch.log(prior) - log_d)).sum()


def losses(rho: torch.Tensor, weights: torch.Tensor, b_hat: torch.Tensor, computed: torch.Tensor,
           cfg: TPCCfg) -> dict[str, torch.Tensor]:
    """Weighted ponder and distribution losses (Eq. 10, 12-14). rho [B, N]; others [B, L, N]."""
    prior = gaussian_prior(weights.shape[1], cfg.target_depth, device=weights.device)
    d = depth_distribution(weights, b_hat, computed, cfg)
    return {"ponder": cfg.phi_p * rho.mean(), "distribution": cfg.phi_d * kl_to_prior(d, prior, cfg)}
