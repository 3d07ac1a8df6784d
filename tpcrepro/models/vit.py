"""TPC on timm's ViT/DeiT blocks, registered with timm as tpc_deit_{t,s,b} and tpc_vit_smoke.

Two forms of the same function:
- masked (training): all K tokens stay in the tensor; queries that are not
  computed keep their state, keys that are not available are masked;
- removed (inference): at each layer only the computed tokens are gathered
  as queries, and only the available ones as keys/values (padded to the
  batch's largest count), the results scattered back; images whose CLS has
  halted leave the batch.
The parameters are exactly the backbone's: a DeiT checkpoint loads as is.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from tpcrepro import flops
from tpcrepro.models import controller as ctl
from tpcrepro.models import host_controller as hc
from tpcrepro.models.registry import DEIT_NAMES, SMOKE_NAME, register_family
from tpcrepro.models.stabilizer import attention

STAT_KEYS = ("n_q", "n_kv", "paused", "halted", "restarted")


def block_forward(blk: Block, x_q: torch.Tensor, x_kv: Optional[torch.Tensor], valid: Optional[torch.Tensor],
                  kappa: Optional[int]) -> torch.Tensor:
    """A timm pre-norm block for queries x_q [B, Nq, C] over keys/values x_kv [B, Nk, C] (None: x_q).

    valid: bool [B, Nq|1, Nk], True where a query may use a key; None = all.
    """
    a = blk.attn
    b, nq, c = x_q.shape
    h = blk.norm1(x_q)
    if x_kv is None:
        q, k, v = a.qkv(h).reshape(b, nq, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    else:
        hk = blk.norm1(x_kv)
        bias = a.qkv.bias
        q = F.linear(h, a.qkv.weight[:c], None if bias is None else bias[:c])
        kv = F.linear(hk, a.qkv.weight[c:], None if bias is None else bias[c:])
        q = q.reshape(b, nq, a.num_heads, a.head_dim).transpose(1, 2)
        k, v = kv.reshape(b, -1, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(q), a.k_norm(k)
    drop = a.attn_drop.p if blk.training else 0.0
    o = attention(q, k, v, None if valid is None else valid[:, None], kappa, a.scale, drop)
    o = a.proj_drop(a.proj(a.norm(o.transpose(1, 2).reshape(b, nq, c))))
    x = x_q + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def layer_masked(blk: Block, x: torch.Tensor, computed: torch.Tensor, kv: torch.Tensor,
                 kappa: Optional[int]) -> torch.Tensor:
    """All tokens in the tensor; only `computed` ones change. x [B, N, C]; masks [B, N]."""
    valid = None
    if not bool(kv.all()):  # each query may use the available keys, and itself (no empty softmax row)
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        valid = kv[:, None, :] | eye
    new = block_forward(blk, x, None, valid, kappa)
    return torch.where(computed[..., None], new, x)


def qkv_split(qkv: torch.nn.Linear, c: int) -> tuple:
    """The query rows and the key/value rows of a qkv projection's weight and bias, as views.

    Kept on the module between calls (slicing them anew is a few tensor ops per layer); a new weight
    (another device or dtype), an in-place change (load_state_dict) or another grad mode makes new views.
    """
    w, bias = qkv.weight, qkv.bias
    key = (w.data_ptr(), w._version, None if bias is None else (bias.data_ptr(), bias._version),
           torch.is_inference_mode_enabled(), torch.is_grad_enabled(), c)
    cached = qkv.__dict__.get("_tpc_split")
    if cached is None or cached[0] != key:
        cached = (key, (w[:c], None if bias is None else bias[:c], w[c:], None if bias is None else bias[c:]))
        qkv.__dict__["_tpc_split"] = cached
    return cached[1]


def call(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) for a block's parts at inference, the standard ones (Identity, Linear, LayerNorm, GELU) without
    nn.Module's call machinery: the same operator on the same arguments, so the same bits, a few µs less each
    (at batch 1 a width-64 block's ~15 parts cost more in calls than in arithmetic). A part with hooks, or of
    another type, is called as a module."""
    t = type(m)
    if t is torch.nn.Identity:
        return x
    if m._forward_hooks or m._forward_pre_hooks:
        return m(x)
    if t is torch.nn.Linear:
        return F.linear(x, m.weight, m.bias)
    if t is LayerNorm and not m._fast_norm or t is torch.nn.LayerNorm:
        return F.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    if t is torch.nn.GELU:
        return F.gelu(x, approximate=m.approximate)
    return m(x)


def block_sets(blk: Block, x_kv: torch.Tensor, nq: int, valid: Optional[torch.Tensor],
               kappa: Optional[int], fused: bool = False) -> torch.Tensor:
    """A timm block at inference whose queries are the first nq rows of its keys/values x_kv [B, Nk, C] ->
    [B, nq, C].

    norm1 runs once on the keys; the query projection only on the first nq rows (one qkv matmul when
    nq = Nk, or when `fused`: then the query rows past nq are computed and dropped, which costs less than a
    second matmul call on a small layer). valid: bool [B, Nk] usable keys (None: all).
    """
    a = blk.attn
    b, nk, c = x_kv.shape
    h = call(blk.norm1, x_kv)
    if nq == nk or fused:
        q, k, v = call(a.qkv, h).reshape(b, nk, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q = q[:, :, :nq]
    else:
        wq, bq, wkv, bkv = qkv_split(a.qkv, c)
        q = F.linear(h[:, :nq], wq, bq).reshape(b, nq, a.num_heads, a.head_dim).transpose(1, 2)
        kv = F.linear(h, wkv, bkv)
        k, v = kv.reshape(b, nk, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = call(a.q_norm, q), call(a.k_norm, k)
    o = attention(q, k, v, None if valid is None else valid[:, None, None, :], kappa, a.scale, 0.0)
    o = call(a.proj, call(a.norm, o.transpose(1, 2).reshape(b, nq, c)))
    x = x_kv[:, :nq] + call(blk.ls1, o)
    return x + call(blk.ls2, mlp_eval(blk.mlp, call(blk.norm2, x)))


def mlp_eval(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's Mlp without its dropouts when they do nothing (inference, or p = 0); any other MLP as it is."""
    if type(mlp) is Mlp and (not mlp.training or mlp.drop1.p == mlp.drop2.p == 0.0):
        return call(mlp.fc2, call(mlp.norm, call(mlp.act, call(mlp.fc1, x))))
    return mlp(x)


# A group's fixed cost on a CPU in MACs of arithmetic, for the cost-based grouping: one more group runs a whole
# block's ~15 operators and a gather and scatter. From a 2-core CPU, fp32 (docs/measure.md): the trained smoke ViT
# at batch 32 ran 0.98x of dense in one padded group and 0.68x in four, ~1 ms a layer for each extra group, which
# is ~5e7 MACs at the ~55 G MACs/s dense DeiT-S ran at there.
GROUP_OVERHEAD_MACS_CPU = 5e7


def fuse_qkv(rows: int, nq: int, nkv: int, c: int, overhead: Optional[float]) -> bool:
    """One qkv matmul over all keys rather than q on the queries and kv on the keys, where the query rows it
    computes for nothing cost less than a matmul call (a sixteenth of a group's fixed cost)."""
    return overhead is not None and rows * (nkv - nq) * c * c < overhead / 16


def group_overhead(overhead: Optional[float], device: torch.device) -> Optional[float]:
    """The cost rule's fixed cost of a group: the model's setting, else the CPU's (None elsewhere: fixed groups)."""
    if overhead is not None:
        return overhead
    return GROUP_OVERHEAD_MACS_CPU if device.type == "cpu" else None


def groups(nq: list[int], buckets: int, nkv: Optional[list[int]] = None, dims: Optional[tuple[int, int]] = None,
           overhead: Optional[float] = None) -> list[list[int]]:
    """Image indices sorted by computed count, cut into groups of equal size (one group below 2 images a group).

    Without `overhead`: `buckets` groups. With it (a group's fixed cost in MACs) and dims = (width C, MLP
    hidden width): the count among 1, 2, 4, … ≤ buckets whose estimated cost is least, each group padded to
    its own largest counts: Σ_g |g|·(nq_g·((2 + 2·hidden/C)·C² + 2·C·nkv_g) + nkv_g·2·C²) + groups·overhead.
    A narrow model (where the operators, not the arithmetic, cost) then runs one padded group.
    """
    if buckets <= 1 or len(nq) < 4:
        return [list(range(len(nq)))]
    order = sorted(range(len(nq)), key=nq.__getitem__)

    def cut(k: int) -> list[list[int]]:
        size = -(-len(order) // k)
        return [order[i:i + size] for i in range(0, len(order), size)]

    if overhead is None or nkv is None or dims is None:
        return cut(buckets) if len(nq) >= 2 * buckets else [order]
    c, hidden = dims
    per_q, per_kv = (2 + 2 * hidden / c) * c * c, 2 * c * c

    def cost(parts: list[list[int]]) -> float:
        total = 0.0
        for part in parts:
            q, kv = max(nq[j] for j in part), max(nkv[j] for j in part)
            total += len(part) * (q * (per_q + 2 * c * kv) + kv * per_kv) + overhead
        return total

    best, k = [order], 2
    while k <= buckets and len(nq) >= 2 * k:
        parts = cut(k)
        if cost(parts) < cost(best):
            best = parts
        k *= 2
    return best


def layer_packed_(blk: Block, x: torch.Tensor, computed: np.ndarray, kv: np.ndarray, buckets: int,
                  kappa: Optional[int], overhead: Optional[float] = None,
                  plan: Optional[hc.Plan] = None) -> torch.Tensor:
    """One block on the computed tokens of x [B, N, C] (updated in place and returned); host masks [B, N] bool,
    computed ⊆ kv: only computed tokens are queries, only kv tokens keys and values.

    The images are cut into groups of similar count (`groups`: `buckets` groups, or by the cost rule with a
    group's fixed cost `overhead`), each padded to its own largest counts. Per image the tokens are ordered
    computed first, then the other keys, then the rest (the plan's order), gathered by one index_select over
    the group; the queries are the first rows of the keys, so one gather and one norm1 serve both. Without
    padding (one image, or equal counts) no attention mask and no write-back select are needed. plan: the
    host controller's (order and counts of these masks), else made here.
    """
    b, n, c = x.shape
    plan = plan or hc.Plan.of(computed, kv)
    nq_i, nkv_i, order = plan.nq, plan.nkv, plan.order
    if nq_i.min() == n:  # every token computed in every image: the plain block
        return block_sets(blk, x, n, None, kappa)
    dev = None if x.device.type == "cpu" else x.device
    index = (lambda a: torch.from_numpy(a)) if dev is None else (lambda a: torch.from_numpy(a).to(dev))  # noqa: E731
    xf = x.view(b * n, c)
    if b == 1:  # one image: its computed tokens, then its other keys, no padding
        nq, nkv = int(nq_i[0]), int(nkv_i[0])
        flat = index(order[0, :nkv])
        new = block_sets(blk, xf.index_select(0, flat).view(1, nkv, c), nq, None, kappa,
                         fuse_qkv(1, nq, nkv, c, overhead))
        xf.index_copy_(0, flat if nkv == nq else index(order[0, :nq]), new.view(-1, c))
        return x
    dims = (c, blk.mlp.fc1.out_features) if overhead is not None and isinstance(blk.mlp, Mlp) else None
    for part in groups(nq_i.tolist(), buckets, nkv_i.tolist(), dims, overhead):
        rows = np.asarray(part)
        gq, gkv = nq_i[rows], nkv_i[rows]
        nq, nkv = int(gq.max()), int(gkv.max())
        ragged = bool(gq.min() != nq or gkv.min() != nkv)
        idx = order[rows, :nkv] + (rows * n)[:, None]  # rows of x viewed as [B·N, C]
        flat = index(idx.reshape(-1))
        x_kv = xf.index_select(0, flat).view(len(rows), nkv, c)
        if nq == n and not ragged:  # every token of these images computed: their plain block
            new = block_sets(blk, x_kv, n, None, kappa)
        else:  # an image's keys are its first nkv rows, its queries its first nq
            valid = index(np.arange(nkv) < gkv[:, None]) if ragged else None
            new = block_sets(blk, x_kv, nq, valid, kappa, fuse_qkv(len(rows), nq, nkv, c, overhead))
            if ragged:  # rows past an image's own count are padding: they keep their value
                new = torch.where(index(np.arange(nq) < gq[:, None])[..., None], new, x_kv[:, :nq])
        new = new.reshape(-1, c)
        xf.index_copy_(0, flat if nq == nkv else index(idx[:, :nq].reshape(-1)),
                       new if new.dtype == x.dtype else new.to(x.dtype))
    return x


class TPCVisionTransformer(VisionTransformer):
    """timm VisionTransformer whose blocks are driven by the token propagation controller.

    forward(x [B, 3, H, W]) -> logits [B, classes], as any timm model; forward_features -> the normed
    halting-weighted outputs of the tokens the prediction reads ([B, 1, C]: CLS); forward_with_stats(x)
    -> {"logits", "stats" (per-layer token counts [B, L], per-image "macs" [B]), "losses" (training)}.
    Training runs the masked form, inference the removed one (or masked: inference="masked").
    """

    # True (LV-ViT): the prediction reads every token's halting-weighted output, so when an
    # image's CLS halts its other tokens halt there too, with their remainders (ctl.finish)
    all_token_outputs = False

    def __init__(self, tpc: Optional[ctl.TPCCfg] = None, kappa: Optional[int] = None,
                 inference: str = "removed", buckets: int = 4, kappa_train_only: bool = False,
                 group_overhead_macs: Optional[float] = None, **kwargs):
        super().__init__(**kwargs)
        self.tpc = tpc or ctl.TPCCfg()
        self._kappa = kappa
        self.kappa_train_only = kappa_train_only  # the stabilizer in training only; dense attention at inference
        self.inference = inference
        self.buckets = buckets  # removed form: at most this many groups of images of similar token count
        # A group's fixed cost in MACs for the cost rule (`groups`: as many groups, 1, 2, 4, … ≤ buckets, as the
        # estimated cost says); None: the device's (GROUP_OVERHEAD_MACS_CPU on a CPU, elsewhere `buckets` groups).
        self.group_overhead_macs = group_overhead_macs
        if self.global_pool != "token":
            raise ValueError(f"TPC predicts from the CLS token: global_pool must be 'token', got {self.global_pool!r}")

    @property
    def kappa(self) -> Optional[int]:
        return None if self.kappa_train_only and not self.training else self._kappa

    @property
    def dims(self) -> flops.ViTDims:
        return flops.ViTDims.of(self)

    # -- shared pieces
    def _embed(self, x: torch.Tensor, box=None) -> torch.Tensor:
        """Patch embedding, prefix tokens and positions. box: MixToken's (TPCLVViT), None here."""
        if box is not None:
            raise ValueError(f"{type(self).__name__} takes no MixToken box (token labeling is LV-ViT's)")
        return self.norm_pre(self._pos_embed(self.patch_embed(x)))

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        """The prediction from the halting-weighted outputs [B, N', C] (N' = 1, CLS only, unless all_token_outputs)."""
        return self._outputs(out)["logits"]

    def _outputs(self, out: torch.Tensor, box=None, token_labels: bool = False) -> dict:
        """Halting-weighted outputs [B, N(, ...), C] -> {"features": normed [B, N', C], "logits": [B, classes]}."""
        features = self.norm(out[:, : self._n_out(out.shape[1])])
        return {"features": features, "logits": self.forward_head(features)}

    def _n_out(self, n: int) -> int:
        return n if self.all_token_outputs else 1

    def _is_cls(self, b: int, n: int, device) -> torch.Tensor:
        is_cls = torch.zeros(b, n, dtype=torch.bool, device=device)
        is_cls[:, : self.num_prefix_tokens] = True
        return is_cls

    def per_image_macs(self, stats: dict) -> torch.Tensor:
        """Each image's MACs from its per-layer counts (n_q, n_kv, κ); the final norm runs on CLS only. [B]."""
        n_final = torch.full_like(stats["n_q"][:, 0], self._n_out(self.dims.num_patches + self.num_prefix_tokens))
        return flops.per_image_vit_macs(self.dims, stats["n_q"], stats["n_kv"], self.kappa, n_final=n_final)

    def macs_all_tokens(self) -> int:
        """MACs of one image when every token is computed at every layer (the backbone's count, κ included)."""
        n = torch.full((1, self.dims.depth), self.dims.num_patches + self.num_prefix_tokens)
        return int(self.per_image_macs({"n_q": n, "n_kv": n})[0])

    @torch.no_grad()
    def gate_report(self, x: torch.Tensor) -> dict:
        """Gate statistics at the current weights: can the controller learn from here?

        σ(γ·t − β) has no gradient unless the gate channels reach about β/γ;
        below a largest break probability of ~1e-6 nothing halts and the
        ponder and distribution losses give no signal.
        """
        was = self.training
        self.eval()
        t = self._embed(x)
        chans = []
        for blk in self.blocks[:-1]:
            t = blk(t)
            chans.append(t[..., list(self.tpc.gate_dims)].float().amax(dim=(0, 1)))
        out = self.forward_masked(x)["stats"]["max_break"].item()
        self.train(was)
        peak = torch.stack(chans).amax(0).tolist()
        return {"max_break": out, "gate_channel_max": peak, "centre": self.tpc.beta / self.tpc.gamma}

    # -- masked form (training, and inference: masked)
    def forward_masked(self, x: torch.Tensor, trace: Optional[list] = None, box=None,
                       token_labels: bool = False) -> dict:
        """{"features", "logits", "stats", "losses" (training)} of the masked form.

        trace, if given, receives per layer {x, computed, paused, halted} ([B, N(, C)]) for inspection;
        box, token_labels: LV-ViT's token-labeling outputs (TPCLVViT).
        """
        x = self._embed(x, box)
        bsz, n, _ = x.shape
        state = ctl.TokenState.start(bsz, n, x.device)
        is_cls = self._is_cls(bsz, n, x.device)
        out = torch.zeros_like(x)
        ws, bhs, comps, rows = [], [], [], {k: [] for k in STAT_KEYS}
        was_paused = torch.zeros_like(is_cls)
        max_break = x.new_zeros(())
        for i, blk in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            computed, paused = state.computed(), state.paused()
            alive = ~state.halted[:, :1]  # after its CLS halts an image's output is final: inference stops there
            kv = computed | (paused if self.tpc.paused_as_kv else torch.zeros_like(paused))
            x = layer_masked(blk, x, computed, kv, self.kappa)
            state, w, halt, b, b_hat = ctl.decide(state, x, computed, last, is_cls, self.tpc)
            if self.all_token_outputs and not last and bool(halt[:, 0].any()):
                state, w_end = ctl.finish(state, images=halt[:, 0])
                w = w + w_end
            if trace is not None:
                trace.append({"x": x.detach(), "computed": computed, "paused": paused, "halted": halt})
            if not last:
                max_break = torch.maximum(max_break, (b * computed).max().detach())
            if last:
                state, w_end = ctl.finish(state)
                w = w + w_end
            out = out + w[..., None] * x
            ws.append(w), bhs.append(b_hat), comps.append(computed)
            for key, m in zip(STAT_KEYS, (computed, kv, paused, halt, computed & was_paused)):
                rows[key].append((m & alive).sum(1))
            was_paused = paused
        stats = {k: torch.stack(v, 1) for k, v in rows.items()}
        stats["max_break"] = max_break
        result = {**self._outputs(out, box, token_labels), "stats": stats}
        if self.training:
            stack = lambda t: torch.stack(t, 1)  # noqa: E731  [B, L, N]
            result["losses"] = ctl.losses(state.rho, stack(ws), stack(bhs), stack(comps), self.tpc)
        return result

    # -- removed form (inference)
    @torch.no_grad()
    def forward_removed(self, x: torch.Tensor, box=None, token_labels: bool = False) -> dict:
        """{"features", "logits", "stats"} of the removed form (arguments as forward_masked's).

        The controller runs on the host (host_controller: numpy, the masked form's values bit for bit): per layer
        the device sends the gate channels and receives the halting weights of the output tokens and the gather
        indices. Only the computed tokens are queries, only the available ones keys and values
        (`layer_packed_`); an image whose CLS has halted leaves the batch with its output final."""
        x = self._embed(x, box).contiguous()
        bsz, n, c = x.shape
        dev, cfg, depth = x.device, self.tpc, len(self.blocks)
        st = hc.HostState.start(bsz, n)
        out = hc.OutputSum(bsz, self._n_out(n), x)  # the outputs of the tokens the prediction reads
        counts = np.zeros((bsz, depth, len(STAT_KEYS)), np.int64)  # per image and layer, in STAT_KEYS' order
        overhead = group_overhead(self.group_overhead_macs, dev)
        for i, blk in enumerate(self.blocks):
            last = i == depth - 1
            plan = hc.plan(st, cfg.paused_as_kv)  # this layer's masks, counts and gather order; st.was_paused set
            x = layer_packed_(blk, x, plan.computed, plan.kv, self.buckets, self.kappa, overhead, plan)
            t = None if last else ctl.gate_channels(x, cfg).float().cpu().numpy()
            w, halt = hc.decide(st, t, plan.computed, plan.nq, last, self.num_prefix_tokens, cfg)  # CLS never pauses
            rows = st.images
            counts[rows, i] = np.stack((plan.nq, plan.nkv, plan.paused, halt.sum(1), plan.restarted), 1)
            ended = st.halted[:, 0] if not last else np.ones(len(rows), bool)
            any_ended = last or bool(ended.any())
            if any_ended and (last or self.all_token_outputs):  # their tokens not yet halted end here too
                w = w + hc.finish(st, ended)
            out.add(w, x)
            if any_ended:  # the prediction of an image whose CLS halted is final: it leaves the batch
                out.end(ended, rows)
                if last or ended.all():
                    break
                keep = ~ended
                x, st = x[torch.from_numpy(keep).to(dev)], st.keep(keep)
                out.keep(keep)
        final = out.result()
        table = torch.from_numpy(counts).to(dev)
        stats = {key: table[..., j] for j, key in enumerate(STAT_KEYS)}
        return {**self._outputs(final, box, token_labels), "stats": stats}

    # -- the model's interface
    def _form(self, x: torch.Tensor, box=None, token_labels: bool = False) -> dict:
        if x.is_meta:  # no values to halt on: the backbone's blocks give the shapes, which are either form's
            t = self.blocks(self._embed(x, box))
            zeros = t.new_zeros(t.shape[0], len(self.blocks), dtype=torch.long)
            return {**self._outputs(t, box, token_labels), "stats": {k: zeros for k in STAT_KEYS}}
        if self.training or self.inference == "masked":
            return self.forward_masked(x, box=box, token_labels=token_labels)
        return self.forward_removed(x, box, token_labels)

    def forward_with_stats(self, x: torch.Tensor) -> dict:
        """{"logits": [B, classes], "stats": {n_q, n_kv, paused, halted, restarted: [B, L], macs: [B], ...},
        "losses": {"ponder", "distribution"} (training only)}."""
        result = self._form(x)
        result.pop("features")
        result["stats"]["macs"] = self.per_image_macs(result["stats"])
        return result

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._form(x)["features"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._form(x)["logits"]


BACKBONE = {f"tpc_deit_{k}": v for k, v in DEIT_NAMES.items()} | {"tpc_vit_smoke": SMOKE_NAME}
register_family(TPCVisionTransformer, "tpc", "TPC-ViT: the token propagation controller", __name__)
