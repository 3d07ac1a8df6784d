"""TPC on Swin-T (timm's SwinTransformer): tpc_swin_t, and the smoke Swin with and without TPC.

Windows need the full grid, so TPC acts inside one stage (stage 3 of Swin-T:
14×14 tokens, 6 blocks, about half the MACs), as METHOD.md §9 reads the
paper. After each block of that stage the controller updates every token's
state from two gate channels of its output. Halted and paused tokens keep
their frozen state in the grid: they still serve as keys and values of
their window (window attention stays dense), but they are not queries, skip
the MLP and do not change. At the end of the stage each token's
halting-weighted output goes on to patch merging; there is no CLS, so no
image stops early, and the prediction uses global average pooling. No
stabilizer (the paper uses none on Swin).

Two forms, as for the ViT: `masked` (training) computes every token and
keeps the new value only where computed; `removed` (inference) runs the
window attention on the grid and norm2 + MLP only on the computed tokens,
packed across the batch (no padding: the MLP is per token). The MACs of an
image are the backbone's count minus what its skipped tokens did not run.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from timm.models._features import feature_take_indices
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

from tpcrepro.models import controller as ctl
from tpcrepro.models.registry import SMOKE_CFG, backbone_cfg, cfg, register

STAT_KEYS = ("n_q", "paused", "halted", "restarted")
SWIN_T = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
# digits at 16×16: 1×1 patches (16×16 tokens), window 4; stage 3 is a 4×4 grid of 4 blocks (~60 % of the MACs)
SMOKE_SWIN = dict(img_size=16, in_chans=1, num_classes=10, patch_size=1, window_size=4, embed_dim=32,
                  depths=(1, 1, 4, 1), num_heads=(1, 2, 4, 8))


# ---------------------------------------------------------------- analytic counter

def _layernorm(n: int, c: int) -> int:
    return 5 * n * c  # as fvcore counts LayerNorm


def block_parts(blk: SwinTransformerBlock, h: int, w: int) -> tuple[int, int]:
    """MACs of one Swin block on an h×w grid: (attention part on the grid, norm2 + MLP per token)."""
    c = blk.norm1.normalized_shape[0]
    wh, ww = blk.window_size
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww  # padded to whole windows
    n_pad = hp * wp
    attn = _layernorm(h * w, c) + 3 * n_pad * c * c + 2 * n_pad * (wh * ww) * c + n_pad * c * c
    hidden = blk.mlp.fc1.out_features
    return attn, 5 * c + 2 * c * hidden


def swin_macs(model: SwinTransformer) -> int:
    """MACs of one image through a timm SwinTransformer, counted as fvcore counts them."""
    pe = model.patch_embed
    gh, gw = pe.grid_size
    kh, kw = pe.proj.kernel_size
    c = pe.proj.out_channels
    total = gh * gw * c * pe.proj.in_channels * kh * kw
    total += _layernorm(gh * gw, c) if not isinstance(pe.norm, torch.nn.Identity) else 0
    h, w = gh, gw
    for stage in model.layers:
        if not isinstance(stage.downsample, torch.nn.Identity):
            h, w = -(-h // 2), -(-w // 2)
            total += _layernorm(h * w, 4 * c) + h * w * 4 * c * stage.downsample.out_dim
            c = stage.downsample.out_dim
        for blk in stage.blocks:
            attn, per_token = block_parts(blk, h, w)
            total += attn + h * w * per_token
    total += _layernorm(h * w, c)
    fc = model.head.fc
    return total + (c * fc.out_features if isinstance(fc, torch.nn.Linear) else 0)


# ---------------------------------------------------------------- TPC on one stage

def block_masked(blk: SwinTransformerBlock, x: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    """x [B, H, W, C]; computed [B, H·W]: the whole block, kept where computed."""
    return torch.where(computed.view(*x.shape[:3], 1), blk(x), x)


def block_removed(blk: SwinTransformerBlock, x: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
    """Window attention on the grid; norm2 and the MLP only on the computed tokens, packed over the batch."""
    if bool(computed.all()):
        return blk(x)
    flat = x.reshape(-1, x.shape[-1])
    idx = computed.reshape(-1).nonzero().squeeze(1)
    a = (x + blk.drop_path1(blk._attn(blk.norm1(x)))).reshape(-1, x.shape[-1])[idx]
    a = a + blk.drop_path2(blk.mlp(blk.norm2(a)))
    return flat.index_copy(0, idx, a).view_as(x)


class TPCSwin(SwinTransformer):
    """timm SwinTransformer with the token propagation controller in one stage.

    forward(x) -> logits [B, classes], forward_features -> [B, H, W, C] (NHWC, as timm's Swin);
    forward_with_stats(x) -> {"logits", "stats" (incl. per-image "macs"), "losses" (training)};
    features_only through forward_intermediates. The parameters are exactly the
    backbone's, so a Swin checkpoint loads as is.
    """

    def __init__(self, tpc: Optional[ctl.TPCCfg] = None, kappa: Optional[int] = None, tpc_stage: int = 2,
                 inference: str = "removed", **kwargs):
        if kappa is not None:
            raise ValueError("TPC on Swin runs without the stabilizer (window attention is already local): "
                             "remove stabilizer.kappa")
        super().__init__(**kwargs)
        self.tpc = tpc or ctl.TPCCfg()
        self.kappa = None
        self.tpc_stage = tpc_stage
        self.inference = inference

    @property
    def full_macs(self) -> int:
        return swin_macs(self)

    @property
    def stage_tokens(self) -> int:
        res = self.layers[self.tpc_stage].blocks[0].input_resolution
        return res[0] * res[1]

    @property
    def skip_macs(self) -> list[int]:
        """Per block of the TPC stage: the MACs of one token that skips norm2 + MLP."""
        stage = self.layers[self.tpc_stage]
        return [block_parts(b, *stage.blocks[0].input_resolution)[1] for b in stage.blocks]

    def _stage(self, x: torch.Tensor, trace: Optional[list] = None) -> tuple[torch.Tensor, dict, dict]:
        stage = self.layers[self.tpc_stage]
        x = stage.downsample(x)
        bsz, h, w, c = x.shape
        n = h * w
        state = ctl.TokenState.start(bsz, n, x.device)
        no_cls = torch.zeros(bsz, n, dtype=torch.bool, device=x.device)
        out = torch.zeros_like(x)
        depth = len(stage.blocks)
        rows = {k: [] for k in STAT_KEYS}
        ws, bhs, comps = [], [], []
        was_paused = torch.zeros_like(no_cls)
        max_break = x.new_zeros(())
        masked = self.training or self.inference == "masked" or x.is_meta  # meta: no values, the fixed-shape form
        for i, blk in enumerate(stage.blocks):
            last = i == depth - 1
            computed, paused = state.computed(), state.paused()
            x = block_masked(blk, x, computed) if masked else block_removed(blk, x, computed)
            t = x.reshape(bsz, n, c)
            state, wt, halt, b, b_hat = ctl.decide(state, t, computed, last, no_cls, self.tpc)
            if last:
                state, w_end = ctl.finish(state)
                wt = wt + w_end
            else:
                max_break = torch.maximum(max_break, (b * computed).max().detach())
            out = out + wt.view(bsz, h, w, 1) * x
            if trace is not None:
                trace.append({"x": t.detach(), "computed": computed, "paused": paused, "halted": halt})
            ws.append(wt), bhs.append(b_hat), comps.append(computed)
            for key, m in zip(STAT_KEYS, (computed, paused, halt, computed & was_paused)):
                rows[key].append(m.sum(1))
            was_paused = paused
        stats = {k: torch.stack(v, 1) for k, v in rows.items()}
        stats["max_break"] = max_break
        losses = {}
        if self.training:
            stack = lambda t: torch.stack(t, 1)  # noqa: E731  [B, L, N]
            losses = ctl.losses(state.rho, stack(ws), stack(bhs), stack(comps), self.tpc)
        return out.to(x.dtype), stats, losses  # the weights are fp32: back to the model's dtype

    def _run(self, x: torch.Tensor, trace: Optional[list] = None) -> tuple[torch.Tensor, dict, dict]:
        """(normed features [B, H, W, C], stats, losses)."""
        x = self.patch_embed(x)
        stats, losses = {}, {}
        for i, stage in enumerate(self.layers):
            if i == self.tpc_stage:
                x, stats, losses = self._stage(x, trace)
            else:
                x = stage(x)
        return self.norm(x), stats, losses

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)[0]

    def forward_with_stats(self, x: torch.Tensor, trace: Optional[list] = None) -> dict:
        """{"logits", "stats": {n_q, paused, halted, restarted: [B, L], macs: [B], max_break}, "losses" (training)}."""
        features, stats, losses = self._run(x, trace)
        stats["macs"] = self.per_image_macs(stats)
        result = {"logits": self.forward_head(features), "stats": stats}
        if self.training:
            result["losses"] = losses
        return result

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, list[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's SwinTransformer.forward_intermediates, the TPC stage giving its halting-weighted output."""
        assert output_fmt == "NCHW", "Output shape must be NCHW."
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        intermediates = []
        x = self.patch_embed(x)
        last = len(self.layers) - 1
        stages = self.layers if not stop_early else self.layers[: max_index + 1]
        i = 0
        for i, stage in enumerate(stages):
            x = self._stage(x)[0] if i == self.tpc_stage else stage(x)
            if i in take_indices:
                inter = self.norm(x) if norm and i == last else x
                intermediates.append(inter.permute(0, 3, 1, 2).contiguous())
        if intermediates_only:
            return intermediates
        if i == last:
            x = self.norm(x)
        return x, intermediates

    def per_image_macs(self, stats: dict) -> torch.Tensor:
        """The backbone's MACs minus norm2 + MLP of every token not computed at a block of the stage. [B]."""
        skipped = self.stage_tokens - stats["n_q"].long()
        per_token = torch.tensor(self.skip_macs, device=skipped.device)
        return self.full_macs - (skipped * per_token).sum(1)

    def macs_all_tokens(self) -> int:
        return self.full_macs

    @torch.no_grad()
    def gate_report(self, x: torch.Tensor) -> dict:
        """Gate statistics of the TPC stage at the current weights (see TPCVisionTransformer.gate_report)."""
        was = self.training
        self.eval()
        t = self.patch_embed(x)
        for stage in self.layers[: self.tpc_stage]:
            t = stage(t)
        stage = self.layers[self.tpc_stage]
        t = stage.downsample(t)
        chans = []
        for blk in stage.blocks[:-1]:
            t = blk(t)
            chans.append(t[..., list(self.tpc.gate_dims)].float().amax(dim=(0, 1, 2)))
        max_break = self.forward_with_stats(x)["stats"]["max_break"].item()
        self.train(was)
        peak = torch.stack(chans).amax(0).tolist()
        return {"max_break": max_break, "gate_channel_max": peak, "centre": self.tpc.beta / self.tpc.gamma}


# timm's Swin cfg (swin_transformer._cfg), for the smoke Swin: digits at 16×16, a 2×2 grid after stage 4
SWIN_SMOKE_CFG = cfg(**{**SMOKE_CFG, "pool_size": (2, 2), "classifier": "head.fc", "license": "mit"})
SWIN_T_TAG = "ms_in1k"
STAGE_FEATURES = dict(out_indices=(0, 1, 2, 3))
register("swin_smoke", SwinTransformer, SMOKE_SWIN, SWIN_SMOKE_CFG,
         "Swin for 16×16 single-channel images (the smoke profile's Swin backbone).", __name__,
         features=dict(flatten_sequential=True, **STAGE_FEATURES), filter_fn=swin_filter)
register("tpc_swin_t", TPCSwin, SWIN_T, backbone_cfg(f"swin_tiny_patch4_window7_224.{SWIN_T_TAG}"),
         "TPC-ViT on Swin-T (swin_tiny_patch4_window7_224), the controller in stage 3.", __name__, tag=SWIN_T_TAG,
         features=dict(feature_cls="getter", **STAGE_FEATURES), filter_fn=swin_filter)
register("tpc_swin_smoke", TPCSwin, SMOKE_SWIN, SWIN_SMOKE_CFG, "TPC-ViT on the smoke Swin, the controller in stage 3.",
         __name__, features=dict(feature_cls="getter", **STAGE_FEATURES), filter_fn=swin_filter)

BACKBONE = {"tpc_swin_t": "swin_tiny_patch4_window7_224", "tpc_swin_smoke": "swin_smoke"}
