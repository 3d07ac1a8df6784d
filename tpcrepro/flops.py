"""MACs: fvcore for models of fixed shape, and an exact analytic counter for adaptive ones.

fvcore counts one multiply-add as one flop, which is what the literature's
"GFLOPs" are; we store that integer as `macs`. fvcore has no handler for
`aten::scaled_dot_product_attention`, so fused attention is switched off
before counting. Adaptive models compute a different number of tokens per
image and layer: their MACs come from the analytic counter on the per-image,
per-layer counts, averaged over images (averaging the counts first would be
wrong: attention is quadratic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn


def fused_attn_off(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _sdpa_macs(inputs, outputs) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: QKᵀ and A·V, dense (a mask is not seen)."""
    from fvcore.nn.jit_handles import get_shape

    q, k = get_shape(inputs[0]), get_shape(inputs[1])
    batch = 1
    for s in q[:-2]:
        batch *= s
    return 2 * batch * q[-2] * k[-2] * q[-1]


def fvcore_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """fvcore's count for one input of `input_shape` ([C, H, W]).

    timm's fused attention is switched off (its matmuls are then counted);
    tpcrepro's own blocks call scaled_dot_product_attention, counted by a
    handle as dense QKᵀ and A·V.
    """
    import warnings

    from fvcore.nn import FlopCountAnalysis

    model = fused_attn_off(model).eval()
    x = torch.zeros(1, *input_shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's use of torch.jit
        fca = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fca = fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        return int(fca.total())


# ---------------------------------------------------------------- analytic counter

@dataclass(frozen=True)
class ViTDims:
    """What the MACs of a plain ViT/DeiT depend on."""

    embed_dim: int
    mlp_hidden: int
    depth: int
    num_patches: int
    embed_macs: int  # patch embedding (a linear projection of patches, or a convolutional stem)
    num_classes: int
    aux_classes: int = 0  # an auxiliary head over the patch tokens (LV-ViT), 0 = none

    @classmethod
    def of(cls, vit: nn.Module) -> "ViTDims":
        pe = vit.patch_embed
        if hasattr(pe, "stem_macs"):
            embed = pe.stem_macs()
        else:
            kh, kw = pe.proj.kernel_size
            embed = pe.num_patches * pe.proj.in_channels * kh * kw * vit.embed_dim
        aux = getattr(vit, "aux_head", None)
        return cls(
            embed_dim=vit.embed_dim, mlp_hidden=vit.blocks[0].mlp.fc1.out_features, depth=len(vit.blocks),
            num_patches=pe.num_patches, embed_macs=embed,
            num_classes=vit.head.out_features if isinstance(vit.head, nn.Linear) else 0,
            aux_classes=aux.out_features if isinstance(aux, nn.Linear) else 0,
        )

    def ends(self, n_final, prefix: int = 1):
        """Patch embedding, final LayerNorm on n_final tokens, head, and the aux head on the patch tokens among them."""
        c = self.embed_dim
        return self.embed_macs + 5 * n_final * c + c * self.num_classes + (n_final - prefix) * c * self.aux_classes


def block_macs(n_q, n_kv, dim: int, mlp_hidden: int, kappa: Optional[int] = None, n_mlp=None):
    """One pre-norm ViT block with n_q tokens computed (queries) and n_kv keys/values.

    norm1 runs on every token that enters attention (5 MACs per element, as
    fvcore counts LayerNorm); q on the queries, k and v on the keys; QKᵀ is
    n_q·n_kv·C; A·V uses min(κ, n_kv) keys per query (Eq. 18: sparse); the
    projection, norm2 and MLP run on the queries only. The top-κ ranking is
    comparisons, not MACs. With n_q = n_kv = N and κ off this is fvcore's
    (4 + 2r)·N·C² + 2·N²·C + 10·N·C. Counts may be ints or integer tensors.
    n_mlp (default n_q): tokens left for norm2 and the MLP when a method
    prunes between attention and MLP (EViT, ToMe).
    """
    c = dim
    n_mlp = n_q if n_mlp is None else n_mlp
    if kappa is None:
        keys_used = n_kv
    else:
        keys_used = n_kv.clamp(max=kappa) if torch.is_tensor(n_kv) else min(kappa, n_kv)
    return (
        5 * n_kv * c
        + n_q * c * c + 2 * n_kv * c * c
        + n_q * n_kv * c + n_q * keys_used * c
        + n_q * c * c
        + 5 * n_mlp * c
        + 2 * n_mlp * c * mlp_hidden
    )


def vit_macs(dims: ViTDims, n_q: Sequence[int], n_kv: Optional[Sequence[int]] = None,
             kappa: Optional[int] = None, n_final: Optional[int] = None) -> int:
    """MACs of one image through a ViT that computes n_q[l] tokens at block l.

    n_kv[l] defaults to n_q[l]; n_final (tokens through the final norm)
    defaults to n_q[-1]. Patch embedding, final LayerNorm and head(s) included.
    """
    if len(n_q) != dims.depth:
        raise ValueError(f"need {dims.depth} per-layer counts, got {len(n_q)}")
    n_kv = n_q if n_kv is None else n_kv
    total = sum(block_macs(q, kv, dims.embed_dim, dims.mlp_hidden, kappa) for q, kv in zip(n_q, n_kv))
    return total + dims.ends(n_q[-1] if n_final is None else n_final)


def per_image_vit_macs(dims: ViTDims, n_q: torch.Tensor, n_kv: Optional[torch.Tensor] = None,
                       kappa: Optional[int] = None, n_final: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each image's own MACs; n_q, n_kv: [B, L] integer counts, n_final: [B] (default n_q[:, -1]). -> [B]."""
    n_q = n_q.long()
    n_kv = n_q if n_kv is None else n_kv.long()
    n_final = n_q[:, -1] if n_final is None else n_final.long()
    return block_macs(n_q, n_kv, dims.embed_dim, dims.mlp_hidden, kappa).sum(1) + dims.ends(n_final)


def mean_vit_macs(dims: ViTDims, n_q: torch.Tensor, n_kv: Optional[torch.Tensor] = None,
                  kappa: Optional[int] = None, n_final: Optional[torch.Tensor] = None) -> float:
    """Mean over images of each image's own MACs (not the MACs at the mean count: attention is quadratic)."""
    return per_image_vit_macs(dims, n_q, n_kv, kappa, n_final).double().mean().item()
