"""DynamicViT (NeurIPS'21) on timm's ViT/DeiT blocks: dynamicvit_deit_{t,s,b}, dynamicvit_vit_smoke.

A predictor before the pruning blocks (0-based 3, 6, 9): LayerNorm → Linear
→ GELU, the channels split into a local half and a global half (mean over
the kept tokens), concatenated → MLP C → C/2 → C/4 → 2 → log-softmax (index
0 = keep). Training: Gumbel-softmax hard decisions (straight-through), all
tokens stay in the tensor and attention is a softmax masked by the decisions
(dropped keys removed, each token keeps itself). Inference: each image keeps
its top-scoring int(196·ρ^s) patches, gathered. Loss: task + ratio loss
(kept fraction against ρ^s) + KL to the frozen backbone's logits + MSE to
its tokens on the kept ones. The backbone trains at 0.01× the predictors' lr
and is frozen (lr 0) for the first epochs; CLS token and position embedding
are not trained.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from tpcrepro import flops
from tpcrepro.methods import DynamicViTCfg  # noqa: F401  (its settings: torch-free, for recipes)
from tpcrepro.models.blocks import TokenBlock, block_forward
from tpcrepro.models.registry import register_family
from tpcrepro.models.stabilizer import nearest_keys


class Predictor(nn.Module):
    """Keep/drop log-probabilities from local and global features. [B, N, C], policy [B, N, 1] -> [B, N, 2]."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        glob = (glob * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp(min=1e-6)
        return self.out_conv(torch.cat([local, glob.expand_as(local)], dim=-1))


def policy_block(blk: TokenBlock, x: torch.Tensor, policy: torch.Tensor, kappa: Optional[int]) -> torch.Tensor:
    """A block whose attention softmax is masked by a differentiable keep policy [B, N] (1 = keep).

    softmax_with_policy as published, exp(l − max)·a / Σ exp(l − max)·a, computed as p·a / Σ p·a with p the
    plain softmax of l (the same value: the softmax's denominator cancels), which is one fused operator
    forward and backward instead of the max, shift, exp and their gradients on [B, H, N, N].
    """
    q, k, v = blk.heads(blk.norm1(x))
    n = x.shape[1]
    logits = (q * blk.attn.scale) @ k.transpose(-2, -1)
    eye = torch.eye(n, device=x.device, dtype=x.dtype)
    allow = policy[:, None, None, :] + (1.0 - policy[:, None, None, :]) * eye  # dropped keys out, self kept
    if kappa is not None and kappa < n:
        allow = allow * nearest_keys(q, k, kappa, (allow > 0)).to(x.dtype)
    weights = logits.softmax(-1) * allow
    attn = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    return blk.residual_mlp(blk.residual_attn(x, attn @ v))


class DynamicViT(VisionTransformer):
    """forward -> logits [B, classes]; forward_with_stats -> {"logits", "stats", "losses" (training)}.

    Training runs the masked form (Gumbel decisions, all tokens in the tensor),
    inference the removed form (each image's top-scoring tokens gathered).
    """

    new_parameter_prefixes = ("predictors.",)  # trained from scratch; backbone checkpoints lack them

    def __init__(self, dynamicvit: Optional[DynamicViTCfg] = None, kappa: Optional[int] = None, **kwargs):
        super().__init__(**{"block_fn": TokenBlock, **kwargs})
        self.dvit = dynamicvit or DynamicViTCfg()
        self.kappa = kappa
        ref = self.pos_embed  # timm may build the model on another device or dtype (create_model(device=...))
        self.predictors = nn.ModuleList(Predictor(self.embed_dim) for _ in self.dvit.locations).to(ref.device,
                                                                                                 ref.dtype)
        self._vit_kwargs = kwargs
        self.cls_token.requires_grad_(False)
        self.pos_embed.requires_grad_(False)
        self._teacher: list = []  # kept out of the module tree: not saved, not counted

    @property
    def dims(self) -> flops.ViTDims:
        return flops.ViTDims.of(self)

    def keep_counts(self) -> list[int]:
        n = self.dims.num_patches
        return [int(n * self.dvit.keep_rate ** (s + 1)) for s in range(len(self.dvit.locations))]

    # -- training support
    def attach_teacher(self) -> None:
        """Freeze a copy of the current backbone weights as the distillation teacher."""
        teacher = VisionTransformer(**self._vit_kwargs)
        teacher.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("predictors.")})
        self._teacher = [teacher.eval().requires_grad_(False)]

    def optimizer_groups(self) -> dict[str, list]:
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return {"predictor": [p for n, p in params if n.startswith("predictors.")],
                "backbone": [p for n, p in params if not n.startswith("predictors.")]}

    def lr_scale(self, group: str, epoch: int) -> float:
        if group != "backbone":
            return 1.0
        return 0.0 if epoch < self.dvit.freeze_epochs else self.dvit.backbone_lr_scale

    # -- forwards
    def forward_masked(self, x: torch.Tensor, deterministic: bool = False, teacher: Optional[tuple] = None) -> dict:
        """All tokens kept in the tensor; decisions by Gumbel-softmax, or top-k of the score if deterministic.

        teacher: (tokens [B, N, C], logits [B, K]) of the frozen backbone, for the distillation losses.
        """
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        b = x.shape[0]
        policy = x.new_ones(b, x.shape[1] - 1, 1)
        decisions, targets = [], []
        for i, blk in enumerate(self.blocks):
            if i in self.dvit.locations:
                s = self.dvit.locations.index(i)
                score = self.predictors[s](x[:, 1:], policy)
                if deterministic:
                    keep = self.keep_counts()[s]
                    masked = score[..., 0].masked_fill(policy[..., 0] == 0, float("-inf"))
                    top = masked.topk(keep, dim=1).indices
                    hard = torch.zeros_like(policy).scatter_(1, top[..., None], 1.0)
                else:
                    hard = F.gumbel_softmax(score, tau=self.dvit.tau, hard=True)[..., :1] * policy
                decisions.append(hard.flatten(1))
                targets.append(self.dvit.keep_rate ** (s + 1))
                policy = hard
            if not decisions:  # before the first predictor every token is kept: the plain block (fused attention)
                x = block_forward(blk, x, None, self.kappa)
                continue
            full = torch.cat([x.new_ones(b, 1), policy[..., 0]], dim=1)
            x = policy_block(blk, x, full, self.kappa)
        x = self.norm(x)
        out = {"features": x, "logits": self.forward_head(x),
               "stats": {"kept": torch.stack([d.sum(1) for d in decisions], 1)}}
        if self.training:
            out["losses"] = self._losses(x, out["logits"], decisions, targets, policy, teacher)
        out["decisions"] = decisions
        return out

    def _losses(self, x, logits, decisions, targets, policy, teacher) -> dict:
        d = self.dvit
        ratio = sum(((dec.mean(1) - t) ** 2).mean() for dec, t in zip(decisions, targets)) / len(decisions)
        losses = {"ratio": d.ratio_weight * ratio}
        if teacher is not None:
            t_tokens, t_logits = teacher
            kl = F.kl_div(F.log_softmax(logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                          reduction="batchmean", log_target=True)
            keep = policy[..., 0] > 0
            mse = F.mse_loss(x[:, 1:][keep].float(), t_tokens[:, 1:][keep].float())
            losses.update(distill_cls=d.cls_distill_weight * kl, distill_tokens=d.token_distill_weight * mse)
        return losses

    @torch.no_grad()
    def forward_removed(self, x: torch.Tensor) -> dict:
        x = self.norm_pre(self._pos_embed(self.patch_embed(x)))
        b, n, c = x.shape
        patch_index = torch.arange(n - 1, device=x.device).expand(b, -1)  # original position of each kept patch
        kept = []
        for i, blk in enumerate(self.blocks):
            if i in self.dvit.locations:
                s = self.dvit.locations.index(i)
                score = self.predictors[s](x[:, 1:], torch.ones_like(x[:, 1:, :1]))
                top = score[..., 0].argsort(dim=1, descending=True)[:, : self.keep_counts()[s]]
                x = torch.cat([x[:, :1], torch.gather(x[:, 1:], 1, top[..., None].expand(-1, -1, c))], dim=1)
                patch_index = torch.gather(patch_index, 1, top)
                kept.append(patch_index)
            x = block_forward(blk, x, None, self.kappa)
        x = self.norm(x)
        return {"features": x, "logits": self.forward_head(x), "kept_index": kept}

    @torch.no_grad()
    def _teach(self, x: torch.Tensor) -> Optional[tuple]:
        if not self._teacher:
            return None
        teacher = self._teacher[0].to(x.device)
        tokens = teacher.forward_features(x)
        return tokens, teacher.forward_head(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normed tokens: all of them (masked form) in training, the kept ones [B, 1 + kept, C] at inference."""
        return self.forward_masked(x)["features"] if self.training else self.forward_removed(x)["features"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_stats(self, x: torch.Tensor) -> dict:
        """Training: {"logits", "stats": {"kept": [B, stages]}, "losses"}; inference: {"logits", "stats": {}}."""
        if self.training:
            out = self.forward_masked(x, teacher=self._teach(x))
            return {k: out[k] for k in ("logits", "stats", "losses")}
        return {"logits": self.forward_removed(x)["logits"], "stats": {}}

    def macs(self) -> int:
        """Blocks at the kept counts, plus the predictors (LayerNorm, Linear, the MLP) on the tokens they score."""
        d, c = self.dims, self.dims.embed_dim
        n, counts, pred = d.num_patches, [], 0
        keep = iter(self.keep_counts())
        for i in range(d.depth):
            if i in self.dvit.locations:
                pred += n * (5 * c + c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2)
                n = next(keep)
            counts.append(n + 1)
        return flops.vit_macs(d, counts, kappa=self.kappa) + pred


register_family(DynamicViT, "dynamicvit", "DynamicViT/0.7", __name__, strict=False,
                smoke_defaults={"dynamicvit": DynamicViTCfg(locations=(2, 4, 6))})
