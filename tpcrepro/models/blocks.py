"""The one place that reaches into timm's ViT Block/Attention: the qkv split and the output projection.

Every method here changes what a block attends to or which tokens leave it,
so each needs the block's two attention halves separately: the queries,
keys and values per head (`heads`), and the heads' output back to the
residual branch (`project`, timm's `proj_drop(proj(norm(·)))`). They are
methods of `TokenBlock`, a timm `Block` with nothing added but these methods
(the parameters are the same, so a DeiT checkpoint loads as is), so that the
blocks built on it can be scripted; on a plain timm `Block` the module-level
functions of the same names apply them. timm attributes used: Block.norm1,
attn (qkv, num_heads, head_dim, scale, q_norm, k_norm, attn_drop, norm, proj,
proj_drop), ls1, drop_path1, norm2, mlp, ls2, drop_path2
(tests/test_timm_api.py checks they exist).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from tpcrepro.models.stabilizer import nearest_keys


class TokenBlock(Block):
    """timm's pre-norm ViT block with its attention's halves as methods; forward is timm's."""

    def heads(self, h: torch.Tensor, h_kv: Optional[torch.Tensor] = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed tokens h [B, Nq, C] (keys and values from h_kv [B, Nk, C]; None: h) -> q, k, v [B, H, N, D].

        q_norm/k_norm applied; with h_kv the query and key/value projections are
        split out of the fused qkv weight (queries and keys are different tokens).
        """
        a = self.attn
        b, nq, c = h.shape
        if h_kv is None:
            q, k, v = a.qkv(h).reshape(b, nq, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            w, bias = a.qkv.weight, a.qkv.bias
            q = F.linear(h, w[:c], None if bias is None else bias[:c])
            kv = F.linear(h_kv, w[c:], None if bias is None else bias[c:])
            q = q.reshape(b, nq, a.num_heads, a.head_dim).transpose(1, 2)
            k, v = kv.reshape(b, h_kv.shape[1], 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return a.q_norm(q), a.k_norm(k), v

    def project(self, o: torch.Tensor) -> torch.Tensor:
        """The heads' output o [B, H, N, D] -> the attention branch [B, N, C] (before ls1 and drop path)."""
        a = self.attn
        b, _, n, _ = o.shape
        return a.proj_drop(a.proj(a.norm(o.transpose(1, 2).reshape(b, n, a.num_heads * a.head_dim))))

    def residual_attn(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x + the attention branch of the heads' output o [B, H, N, D]."""
        return x + self.drop_path1(self.ls1(self.project(o)))

    def residual_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x + the MLP branch (norm2, mlp, ls2, drop path)."""
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: Optional[torch.Tensor],
                  kappa: Optional[int]) -> torch.Tensor:
        """softmax(q·kᵀ·scale)·v over the valid keys, top-κ if kappa (the stabilizer). [B, H, Nq, D]."""
        a = self.attn
        drop = a.attn_drop.p if self.training else 0.0
        if torch.jit.is_scripting():  # the Triton kernel is not scriptable: the same function in PyTorch
            mask = valid
            if kappa is not None and kappa < k.shape[-2]:
                mask = nearest_keys(q, k, kappa, valid)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=a.scale)
        return _stabilized(q, k, v, valid, kappa, a.scale, drop)


@torch.jit.unused
def _stabilized(q, k, v, valid, kappa, scale, drop):
    from tpcrepro.models.stabilizer import attention

    return attention(q, k, v, valid, kappa, scale, drop)


# the same operations on any timm Block (plain backbones, figures)
def heads(blk: Block, h: torch.Tensor, h_kv: Optional[torch.Tensor] = None):
    return TokenBlock.heads(blk, h, h_kv)


def project(blk: Block, o: torch.Tensor) -> torch.Tensor:
    return TokenBlock.project(blk, o)


def block_forward(blk: Block, x: torch.Tensor, valid: Optional[torch.Tensor] = None,
                  kappa: Optional[int] = None) -> torch.Tensor:
    """A whole pre-norm block with masked and/or top-κ attention. x [B, N, C]; valid bool [B, 1|H, N, N]."""
    q, k, v = heads(blk, blk.norm1(x))
    x = x + blk.drop_path1(blk.ls1(project(blk, TokenBlock.attention(blk, q, k, v, valid, kappa))))
    return TokenBlock.residual_mlp(blk, x)
