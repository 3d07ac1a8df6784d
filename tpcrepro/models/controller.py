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


def gate_channels(t: torch.Tensor, cfg: TPCCfg) -> torch.Tensor:
    """The gate channels of the block output t [B, N, C] -> [B, N, 2] (i, j), or [B, N, 1] with single_gate."""
    i, j = cfg.gate_dims
    return t[..., i:i + 1] if cfg.single_gate else t[..., i:i + 2] if j == i + 1 else t[..., [i, j]]


def gate_probs(t: torch.Tensor, cfg: TPCCfg) -> torch.Tensor:
    """σ(γ·t − β) of the gate channels of the block output t [B, N, C] -> [B, N, 2] (pause p, non-restart r̃),
    or [B, N, 1] (p) with single_gate (A-ViT); float32 (t's dtype if wider).

    Computed in float64 and rounded: the removed form's host controller computes the same in numpy
    (host_controller.gate_probs), and float64 sigmoids of two libraries, rounded to float32, agree (in every
    one of 20 M values tested), where float32 sigmoids do not.
    """
    sign = -1.0 if cfg.gate_sign == "minus" else 1.0
    out = torch.float64 if t.dtype == torch.float64 else torch.float32
    return gate_channels(t, cfg).double().mul(cfg.gamma).add_(sign * cfg.beta).sigmoid_().to(out)


def gates(t: torch.Tensor, cfg: TPCCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Pause p and non-restart r̃ from the block output t [B, N, C] -> ([B, N], [B, N]).

    With single_gate (A-ViT), r̃ ≡ 1 so b = p.
    """
    g = gate_probs(t, cfg)
    if cfg.single_gate:
        return g[..., 0], torch.ones_like(g[..., 0])
    return g[..., 0], g[..., 1]


def regularize(b: torch.Tensor, computed: torch.Tensor, cfg: TPCCfg) -> torch.Tensor:
    """TDR (Eq. 9): mix each token's b with the mean b of the tokens computed in its image. [B, N].

    The mean is summed in float64 and rounded to b's float32: float32 sums depend on the order of summation
    (numpy's and torch's differ in about half of 65-token rows), float64 sums of float32 values rounded back
    agree across orders (in every one of 80,000 such rows tested), so the removed form's host controller,
    which sums with numpy, takes the same decisions bit for bit.
    """
    if not cfg.tdr or cfg.xi == 1.0:
        return b
    m = computed.double()
    mean = ((b.double() * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_(min=1.0)).to(b.dtype)
    return mean + cfg.xi * (b - mean)  # ξ·b + (1 − ξ)·mean, in the operations host_controller repeats


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
