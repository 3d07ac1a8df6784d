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

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer

from tpcrepro import flops
from tpcrepro.models import controller as ctl
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


def block_sets(blk: Block, x_kv: torch.Tensor, nq: int, valid: Optional[torch.Tensor],
               kappa: Optional[int]) -> torch.Tensor:
    """A timm block whose queries are the first nq rows of its keys/values x_kv [B, Nk, C] -> [B, nq, C].

    norm1 runs once on the keys; the query projection only on the first nq
    rows (one qkv matmul when nq = Nk). valid: bool [B, Nk] usable keys (None: all).
    """
    a = blk.attn
    b, nk, c = x_kv.shape
    h = blk.norm1(x_kv)
    if nq == nk:
        q, k, v = a.qkv(h).reshape(b, nk, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    else:
        wq, bq, wkv, bkv = qkv_split(a.qkv, c)
        q = F.linear(h[:, :nq], wq, bq).reshape(b, nq, a.num_heads, a.head_dim).transpose(1, 2)
        kv = F.linear(h, wkv, bkv)
        k, v = kv.reshape(b, nk, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k = a.q_norm(q), a.k_norm(k)
    o = attention(q, k, v, None if valid is None else valid[:, None, None, :], kappa, a.scale, 0.0)
    o = a.proj(a.norm(o.transpose(1, 2).reshape(b, nq, c)))
    x = x_kv[:, :nq] + blk.ls1(o)
    return x + blk.ls2(mlp_eval(blk.mlp, blk.norm2(x)))


def mlp_eval(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's Mlp without its dropouts when they do nothing (inference, or p = 0); any other MLP as it is."""
    if type(mlp) is Mlp and (not mlp.training or mlp.drop1.p == mlp.drop2.p == 0.0):
        return mlp.fc2(mlp.norm(mlp.act(mlp.fc1(x))))
    return mlp(x)


def layer_sets_(blk: Block, x: torch.Tensor, computed: torch.Tensor, kv: torch.Tensor, sizes: tuple,
                kappa: Optional[int]) -> torch.Tensor:
    """One block on the computed tokens of x [B, N, C] (updated in place and returned); masks [B, N], computed ⊆ kv.

    sizes (host ints, read once per layer): (largest computed count, largest
    kv count, whether counts differ between images). Per image the tokens
    are ordered computed first, then the other keys (one argsort), gathered
    once by index_select; the queries are the first rows of the keys, so
    one gather and one norm1 serve both. Without padding (batch 1, or equal
    counts) no mask and no write-back select are needed.
    """
    nq, nkv, ragged = sizes
    b, n, c = x.shape
    if nq == n and not ragged:  # every token computed in every image: the plain block
        return block_forward(blk, x, None, None, kappa)
    key = kv.to(torch.int8) + computed  # 2: query and key, 1: key only, 0: neither
    idx = torch.argsort(key, dim=1, descending=True, stable=True)[:, :nkv]
    flat = idx if b == 1 else idx + torch.arange(0, b * n, n, device=x.device)[:, None]
    xf = x.view(b * n, c)
    x_kv = xf.index_select(0, flat.reshape(-1)).view(b, nkv, c)
    valid = key.gather(1, idx) if ragged else None
    new = block_sets(blk, x_kv, nq, None if valid is None else valid > 0, kappa)
    if ragged:  # rows past an image's own count are padding: they keep their value
        new = torch.where((valid[:, :nq] == 2)[..., None], new, x_kv[:, :nq])
    new = new.reshape(-1, c)
    xf.index_copy_(0, flat[:, :nq].reshape(-1), new if new.dtype == x.dtype else new.to(x.dtype))
    return x


def host_sizes(nq: list[int], nkv: list[int]) -> tuple[int, int, bool]:
    """(largest computed count, largest kv count, counts differ) of a group of images."""
    return max(nq), max(nkv), min(nq) != max(nq) or min(nkv) != max(nkv)


# A group's fixed cost on a CPU in MACs of arithmetic, for the cost-based grouping (group_overhead_macs): one more
# group runs a whole block's ~35 operators and a gather and scatter. From a 2-core CPU, fp32 (docs/measure.md): the
# trained smoke ViT at batch 32 ran 0.98x of dense in one padded group and 0.68x in four, ~1 ms a layer for each
# extra group, which is ~5e7 MACs at the ~55 G MACs/s dense DeiT-S ran at there.
GROUP_OVERHEAD_MACS_CPU = 5e7


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


def layer_grouped_(blk: Block, x: torch.Tensor, computed: torch.Tensor, kv: torch.Tensor, nq: list[int],
                   nkv: list[int], buckets: int, kappa: Optional[int], overhead: Optional[float] = None) -> torch.Tensor:
    """layer_sets_ on each group of images of similar count (host counts nq, nkv per image); x updated in place.

    How many groups: `groups` (overhead: a group's fixed cost in MACs for the cost rule; None: `buckets` groups)."""
    dims = (x.shape[-1], blk.mlp.fc1.out_features) if overhead is not None and isinstance(blk.mlp, Mlp) else None
    parts = groups(nq, buckets, nkv, dims, overhead)
    if len(parts) == 1:
        return layer_sets_(blk, x, computed, kv, host_sizes(nq, nkv), kappa)
    for part in parts:
        i = torch.tensor(part, device=x.device)
        sizes = host_sizes([nq[j] for j in part], [nkv[j] for j in part])
        x.index_copy_(0, i, layer_sets_(blk, x.index_select(0, i), computed[i], kv[i], sizes, kappa))
    return x


def layer_removed(blk: Block, x: torch.Tensor, computed: torch.Tensor, kv: torch.Tensor,
                  kappa: Optional[int], buckets: int = 1) -> torch.Tensor:
    """Only computed tokens are queries and only `kv` tokens keys/values (computed ⊆ kv), gathered and padded.

    Padding to the batch's largest count wastes the difference to the mean;
    with buckets > 1 the images are sorted by their count and run in that
    many groups, each padded only to its own largest count. x is not changed.
    """
    counts = torch.stack((computed.sum(1), kv.sum(1))).tolist()  # the one host read of this layer
    return layer_grouped_(blk, x.clone(), computed, kv, counts[0], counts[1], buckets, kappa)


def removed_tail(R: torch.Tensor, halted: torch.Tensor, pause_left: torch.Tensor, x: torch.Tensor,
                 computed: torch.Tensor, paused: torch.Tensor, n_computed: torch.Tensor, may_pause: torch.Tensor,
                 first: torch.Tensor, acc: torch.Tensor, cfg: ctl.TPCCfg) -> tuple:
    """The removed form between two blocks (not after the last): the controller's decision on the block output
    x [B, N, C] (ctl.decide_removed), its halting-weighted outputs added to acc [B, k, C], then the next layer's
    masks and the rows of its host read.

    Returns (R, halted, pause_left, acc, computed, paused, kv, sums): the next layer's computed / paused / kv
    masks [B, N] and sums [B, 6] (computed, kv, paused, restarted, halted at this layer, CLS halted).
    """
    state = ctl.TokenState(R, R, halted, pause_left)  # ρ is not read at inference
    state, w, halt = ctl.decide_removed(state, x, computed, n_computed, False, may_pause, cfg)
    k = acc.shape[1]
    acc = acc.addcmul(w[:, :k, None], x[:, :k])
    running = ~state.halted
    nxt = running & (state.pause_left == 0)
    now_paused = running ^ nxt
    kv = running if cfg.paused_as_kv else nxt
    sums = torch.stack((nxt, kv, now_paused, nxt & paused, halt, state.halted & first), 1).sum(-1)
    return state.R, state.halted, state.pause_left, acc, nxt, now_paused, kv, sums


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
        self.buckets = buckets  # removed form: images grouped by token count, padded per group
        # None: `buckets` groups; a group's fixed cost in MACs (GROUP_OVERHEAD_MACS_CPU on a CPU): as many groups
        # (1, 2, 4, … ≤ buckets) as the estimated cost says. The padding changes the rounding, and a token whose
        # halting sum lies within rounding of 1 − δ may then halt a layer apart: records keep the fixed split.
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

        Per layer one host read (each image's computed, kv, paused and restarted counts, the tokens it halted at the
        previous layer and whether its CLS has halted) drives the packing and the batch shrinking and gives the
        stats rows, which are kept on the host and become one tensor at the end. Between two blocks the controller
        (`removed_tail`: the decision, the output sum, the next layer's masks and counts) is a fixed set of tensor
        ops on [B, N] with no host read."""
        x = self._embed(x, box).contiguous()
        bsz, n, c = x.shape
        state = ctl.TokenState.start(bsz, n, x.device)
        is_cls = self._is_cls(bsz, n, x.device)
        may_pause = ~is_cls
        first = torch.zeros(1, n, dtype=torch.bool, device=x.device)
        first[0, 0] = True  # the CLS token: an image ends once it has halted
        depth = len(self.blocks)
        images = list(range(bsz))  # original batch index of each image still running
        k = self._n_out(n)  # tokens whose outputs the prediction reads
        acc = torch.zeros(bsz, k, c, device=x.device, dtype=x.dtype)
        final = torch.zeros(bsz, k, c, device=x.device, dtype=x.dtype)
        counts = [[[0] * 5 for _ in range(depth)] for _ in range(bsz)]  # (n_q, n_kv, paused, restarted, halted)
        computed = kv = ~state.halted  # before the first block every token is computed, none paused
        paused = torch.zeros_like(computed)
        host = [[n, n, 0, 0, 0, 0]] * bsz  # the first layer's rows of the host read, known without one
        sums = torch.tensor(host, dtype=torch.long, device=x.device)
        for i, blk in enumerate(self.blocks):
            if i:
                host = sums.tolist()  # the one host read of this layer: [images][6]
                for j, h in zip(images, host):
                    counts[j][i - 1][4] = h[4]
            done = [h[5] > 0 for h in host]
            if any(done):  # images whose CLS halted at the previous layer end there (ctl.finish) and leave
                ended = torch.tensor(done, device=x.device)
                acc, final = self._finish(acc, final, state, images, ended, x)
                keep = ~ended
                x, acc, may_pause = x[keep], acc[keep], may_pause[keep]
                state, computed, paused, kv, sums = (state.index(keep), computed[keep], paused[keep], kv[keep],
                                                     sums[keep])
                images = [j for j, d in zip(images, done) if not d]
                host = [h for h, d in zip(host, done) if not d]
                if not images:
                    break
            for j, h in zip(images, host):
                counts[j][i][:4] = h[:4]
            x = layer_grouped_(blk, x, computed, kv, [h[0] for h in host], [h[1] for h in host], self.buckets,
                               self.kappa, self.group_overhead_macs)
            last = i == depth - 1
            if last:  # b̂ = 1: every computed token halts with its remainder; the images still running end below
                acc = acc.addcmul_(torch.where(computed, state.R, 0.0)[:, :k, None], x[:, :k])
                state = ctl.TokenState(state.R, state.rho, state.halted | computed, state.pause_left)
                break
            R, halted, pause_left, acc, computed, paused, kv, sums = removed_tail(
                state.R, state.halted, state.pause_left, x, computed, paused, sums[:, :1], may_pause, first, acc,
                self.tpc)
            state = ctl.TokenState(R, state.rho, halted, pause_left)
        if images:  # after the last layer every token has halted (b̂ = 1): the images still running end here
            for j, h in zip(images, host):
                counts[j][depth - 1][4] = h[0]  # every computed token halts at the last layer
            acc, final = self._finish(acc, final, state, images, torch.ones(len(images), dtype=torch.bool,
                                                                              device=x.device), x)
        table = torch.tensor(counts, dtype=torch.long, device=x.device)
        stats = {key: table[..., j] for key, j in zip(STAT_KEYS, (0, 1, 2, 4, 3))}
        return {**self._outputs(final, box, token_labels), "stats": stats}

    def _finish(self, acc, final, state, images, ended, x):
        """Tokens of the `ended` images not yet halted add their remainder (ctl.finish); their output is final.

        images: the original batch index of each running image (host ints); ended: bool [running images]."""
        k = acc.shape[1]
        acc = acc + (state.R * ~state.halted)[:, :k, None] * ended[:, None, None] * x[:, :k]
        final[torch.tensor(images, device=x.device)[ended]] = acc[ended]
        return acc, final

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
