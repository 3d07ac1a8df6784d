"""fit / evaluate: one loop for every model, single process or DDP through torchrun.

A run directory holds `checkpoint.pt` (written atomically after every epoch,
with optimizer, scheduler, scaler, EMA and RNG state) and `metrics.jsonl`
(one line per epoch). A run directory with a checkpoint resumes from it.
A model's forward may return logits, or a mapping with `logits` and `losses`
(named, already weighted loss terms added to the task loss) and `stats`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from tpcrepro import checkpoint as ckpt
from tpcrepro import data as data_mod
from tpcrepro import distributed
from tpcrepro.errors import UserError
from tpcrepro.progress import EpochProgress, log
from tpcrepro.recipe import Recipe, TrainCfg
from tpcrepro.stats import StatSum

EVAL_KEYS = ("top1", "top5", "n_val", "val_skipped", "correct_top1")  # what evaluate() gives besides token stats
GATE_WARN = 1e-6  # below this largest break probability the controller cannot learn
StepHook = Callable[[int, int], None]  # (epoch, step) -> None; may raise to stop


def split_output(out) -> tuple[torch.Tensor, dict, dict]:
    if isinstance(out, Mapping):
        return out["logits"], dict(out.get("losses", {})), dict(out.get("stats", {}))
    return out, {}, {}


def criterion_for(aug, mixing: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixing:
        return SoftTargetCrossEntropy()
    if aug.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=aug.smoothing)
    return nn.CrossEntropyLoss()


def autocast(cfg: TrainCfg, device: str):
    if cfg.amp and device.startswith("cuda"):
        dtype = torch.bfloat16 if cfg.amp_dtype == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@torch.inference_mode()
def evaluate(model: nn.Module, loader, d: distributed.Dist, cfg: Optional[TrainCfg] = None,
             per_image: bool = False) -> dict:
    """Top-1 / top-5 (percent) over the whole split, exact under DDP (no padded samples).

    `per_image` adds `correct_top1`: each validation image's top-1 hit in data-set order (see `pack_correct`).
    """
    model.eval()
    correct1 = correct5 = total = skipped = 0
    token_stats = StatSum()
    hits1: list[torch.Tensor] = []
    ctx = autocast(cfg, d.device) if cfg else nullcontext()
    for x, y, n_skip in loader:
        skipped += n_skip
        if x is None:
            continue
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with ctx:
            logits, _, stats = split_output(model(x))
        token_stats.add(stats)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == y[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        total += len(y)
        hits1.append(hit[:, 0].cpu())
    correct1, correct5, total, skipped = distributed.all_sum([correct1, correct5, total, skipped], d)
    if total == 0:
        raise UserError("the validation split yielded no readable image; check the data directory")
    out = {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total,
           "n_val": int(total), "val_skipped": int(skipped), **token_stats.means(d)}
    if per_image and skipped == 0:  # with skipped images the order is lost: no per-image record
        out["correct_top1"] = gather_correct(hits1, loader.sampler, int(total), d)
    return out


def gather_correct(hits: list[torch.Tensor], sampler, n: int, d: distributed.Dist) -> str:
    """This rank's top-1 hits (in its sampler's order) -> every image's hit in data-set order, packed."""
    mine = torch.cat(hits).double() if hits else torch.zeros(0, dtype=torch.float64)
    idx = list(getattr(sampler, "idx", range(n)))  # ShardSampler: rank, rank + world, ...
    full = torch.zeros(n, dtype=torch.float64)
    full[idx[: len(mine)]] = mine
    full = torch.tensor(distributed.all_sum(full.tolist(), d)) if d.world > 1 else full
    return pack_correct(full.numpy() > 0.5)


def pack_correct(flags: np.ndarray) -> str:
    """bool [n] -> base64 of the packed bits (n is kept beside it as n_val)."""
    import base64

    return base64.b64encode(np.packbits(np.asarray(flags, dtype=bool)).tobytes()).decode("ascii")


def unpack_correct(text: str, n: int) -> np.ndarray:
    """Inverse of pack_correct: base64 text and the image count -> bool [n]."""
    import base64

    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:n].astype(bool)


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Reseed at each epoch start, so a resumed run draws exactly what an unbroken one draws."""
    import random

    import numpy as np

    s = seed * 100003 + epoch * 101 + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in named groups (a model's `optimizer_groups()`, else one group), no decay on 1-D."""
    named = model.optimizer_groups() if hasattr(model, "optimizer_groups") else {
        "all": [p for p in model.parameters() if p.requires_grad]}
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()  # timm: pos_embed, cls_token
    no_decay = {id(p) for n, p in model.named_parameters() if n in skip or p.ndim <= 1}
    groups = []
    for name, params in named.items():
        split = ((weight_decay, [p for p in params if id(p) not in no_decay]), (0.0, [p for p in params if id(p) in no_decay]))
        for decay, ps in split:
            if ps:
                groups.append({"params": ps, "weight_decay": decay, "name": name})
    return groups


def epoch_line(epoch: int, epochs: int, row: dict) -> str:
    """One console line per epoch; for controllers also their losses and the tokens computed/paused per layer."""
    top1 = f"{row['top1']:.2f}" if "top1" in row else "-"  # epochs between evaluations (eval.every)
    text = f"epoch {epoch + 1}/{epochs}  loss {row['loss']:.4f}  top1 {top1}  {row['train_images_per_sec']:.0f} img/s"
    if "ponder_loss" in row:
        text += f"  task {row['task_loss']:.4f} ponder {row['ponder_loss']:.4f} dist {row['distribution_loss']:.4f}"
    if "tokens_n_q" in row:
        fmt = lambda v: " ".join(f"{x:.0f}" for x in v)  # noqa: E731
        text += f"\n  val tokens computed/layer [{fmt(row['tokens_n_q'])}] paused [{fmt(row['tokens_paused'])}]"
        text += f" restarted [{fmt(row['tokens_restarted'])}] halted [{fmt(row['tokens_halted'])}]"
        text += f"  MACs {row['macs'] / 1e6:.2f} M"
    return text


class Fit:
    """State of one training run: model, optimizer, scheduler, scaler, EMA, loaders."""

    def __init__(self, recipe: Recipe, model: nn.Module, run_dir: Path, d: distributed.Dist,
                 data_root: Optional[str] = None, seed: int = 0):
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        self.recipe, self.cfg, self.run_dir, self.d, self.seed = recipe, recipe.train, Path(run_dir), d, seed
        cfg = self.cfg
        if cfg.batch_size % d.world:
            raise UserError(f"train.batch_size {cfg.batch_size} is not divisible by {d.world} processes")
        self.token_labels = bool(recipe.data.token_labels)
        if self.token_labels and not hasattr(getattr(model, "aux_head", None), "weight"):
            raise UserError(f"data.token_labels trains an aux head per token; {recipe.model.name} has none (use LV-ViT)")
        grid = tuple(model.patch_embed.grid_size) if hasattr(model, "patch_embed") else None
        ds = data_mod.build_datasets(recipe.data, recipe.model, data_root, token_grid=grid, seed=seed)
        self.num_classes = ds.num_classes
        workers = recipe.data.workers
        self.train_loader = data_mod.train_loader(ds.train, cfg.batch_size // d.world, workers,
                                                  recipe.data.aug, seed, d.rank, d.world)
        self.val_loader = data_mod.eval_loader(ds.val, recipe.eval.batch_size // d.world or 1, workers, d.rank, d.world)
        self.mixup = None if self.token_labels else data_mod.mixup_fn(recipe.data.aug, ds.num_classes)
        self.criterion = criterion_for(recipe.data.aug, self.mixup is not None)
        self.model = model.to(d.device)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[d.local_rank]
                    if d.device.startswith("cuda") else None) if d.world > 1 else self.model)
        self.optimizer = create_optimizer_v2(param_groups(self.model, cfg.weight_decay), opt=cfg.optimizer, lr=cfg.lr,
                                             weight_decay=cfg.weight_decay)
        self.steps_per_epoch = max(1, len(self.train_loader))
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=max(1, cfg.epochs * self.steps_per_epoch), lr_min=cfg.min_lr,
            warmup_t=cfg.warmup_epochs * self.steps_per_epoch, warmup_lr_init=cfg.warmup_lr, t_in_epochs=False,
        )
        fp16 = cfg.amp and cfg.amp_dtype == "fp16" and d.device.startswith("cuda")
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay)
        self.start_epoch = 0

    # -- checkpoints
    @property
    def ckpt_path(self) -> Path:
        return self.run_dir / ckpt.CHECKPOINT

    def state(self, epoch: int) -> dict:
        return {
            "epoch": epoch, "recipe": self.recipe.id, "recipe_hash": self.recipe.hash, "seed": self.seed,
            "overrides": list(self.recipe.overrides),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None,
            "ema": self.ema.module.state_dict() if self.ema else None, "rng": ckpt.rng_state(),
        }

    def resume(self) -> bool:
        state = ckpt.load(self.ckpt_path)
        if state is None:
            return False
        if state.get("recipe_hash") != self.recipe.hash:
            raise UserError(
                f"{self.run_dir} holds a checkpoint of another recipe version ({state.get('recipe_hash')} != "
                f"{self.recipe.hash}); pass --force to start over there, or --run-dir elsewhere"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state.get("ema"):
            self.ema.module.load_state_dict(state["ema"])
        ckpt.set_rng_state(state["rng"])
        self.start_epoch = state["epoch"]
        self._truncate_metrics(self.start_epoch)
        return True

    def _truncate_metrics(self, epochs_done: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if self.d.main and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["epoch"] < epochs_done]
            path.write_text("".join(ln + "\n" for ln in keep))

    # -- loop
    def train_epoch(self, epoch: int, hook: Optional[StepHook]) -> dict:
        d = self.d
        self.ddp.train()
        if hasattr(self.model, "set_epoch"):  # schedules inside a method (EViT's keep-rate warm-up)
            self.model.set_epoch(epoch)
        if hasattr(self.model, "lr_scale"):  # per-group lr (DynamicViT: backbone 0.01x, frozen at first)
            for g in self.optimizer.param_groups:
                g["lr_scale"] = self.model.lr_scale(g["name"], epoch)
        _seed_epoch(self.seed, epoch, d.rank)
        data_mod.set_epoch(self.train_loader.dataset, epoch)  # scenes: this epoch's fresh draws
        if hasattr(self.train_loader.sampler, "set_epoch"):  # the offset gives each seed its own order
            self.train_loader.sampler.set_epoch(epoch + 100003 * self.seed)
        sums: dict[str, float] = {}
        token_stats = StatSum()
        images, skipped, t0 = 0, 0, time.perf_counter()
        with EpochProgress(epoch, self.cfg.epochs, self.steps_per_epoch, enabled=d.main) as bar:
            for step, (x, y, n_skip) in enumerate(self.train_loader):
                skipped += n_skip
                if x is None:
                    continue
                if hook:
                    hook(epoch, step)
                terms, stats = self.train_step(x, y, epoch, step)
                token_stats.add(stats)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                images += len(x)
                rate = images * d.world / (time.perf_counter() - t0)
                bar.update(loss=terms["loss"], lr=self.optimizer.param_groups[0]["lr"], images_per_sec=rate)
        n = max(1, len(self.train_loader))
        out = {k: v / n for k, v in sums.items()}
        out.update(train_images_per_sec=images * d.world / (time.perf_counter() - t0), train_skipped=skipped)
        out.update(token_stats.means(d, prefix="train_"))
        return out

    def token_label_step(self, x, y, dense) -> tuple[torch.Tensor, dict, dict]:
        """LV-ViT's objective: soft CE on head(CLS) + weight × per-token soft CE on the aux head, with MixToken."""
        from tpcrepro import token_labeling as tl

        data, grid = self.recipe.data, tuple(self.model.patch_embed.grid_size)
        box, lam = None, 1.0
        if data.mixtoken:
            box, lam = tl.rand_box(grid, float(np.random.beta(1.0, 1.0)))
        target = tl.mix_targets(y, self.num_classes, lam, data.aug.smoothing)
        out = self.ddp(x, box=box, dense=True)
        _, losses, stats = split_output(out)
        task = tl.token_label_loss(out["logits"], out["aux_tokens"], target, dense, data.token_label_weight)
        return task, losses, stats

    def train_step(self, x, y, epoch: int, step: int) -> dict:
        d, cfg = self.d, self.cfg
        dense = None
        if isinstance(y, (list, tuple)):  # token labeling: (labels, dense targets [B, N, K])
            y, dense = y[0], y[1].to(d.device, non_blocking=True)
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        if self.mixup is not None:
            if len(x) % 2:  # timm's batch mixup pairs images; a skipped image can leave an odd batch
                x, y = x[:-1], y[:-1]
            x, y = self.mixup(x, y)
        with autocast(cfg, d.device):
            if dense is not None:
                task, losses, stats = self.token_label_step(x, y, dense)
            else:
                logits, losses, stats = split_output(self.ddp(x))
                task = self.criterion(logits.float(), y)
            loss = task + sum(losses.values()) if losses else task
        bad = not bool(torch.isfinite(loss))
        if d.world > 1:  # every rank must stop together, or the others hang in the next all-reduce
            bad = distributed.all_sum([float(bad)], d)[0] > 0
        if bad:
            raise UserError(
                f"loss is {loss.item()} at epoch {epoch} step {step}; lower train.lr or set train.clip_grad "
                f"(the last good checkpoint is kept in {self.run_dir})"
            )
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step_update(epoch * self.steps_per_epoch + step + 1)
        if self.ema:
            self.ema.update(self.model)
        terms = {"loss": loss.item(), "task_loss": task.item(), **{f"{k}_loss": v.item() for k, v in losses.items()}}
        return terms, stats

    def gate_report(self) -> dict:
        """For controllers: the gates' statistics on one training batch, with a warning if they cannot learn."""
        if not hasattr(self.model, "gate_report"):
            return {}
        x = next(x for x, _, _ in self.train_loader if x is not None)
        rep = self.model.gate_report(x.to(self.d.device))
        if self.d.main:
            peaks = ", ".join(f"{v:.2f}" for v in rep["gate_channel_max"])
            log(f"gates at start: largest break probability {rep['max_break']:.3g}; gate channels peak at {peaks} "
                f"(centre β/γ = {rep['centre']:.2f})")
            if rep["max_break"] < GATE_WARN:
                log(f"[yellow]warning:[/] the largest break probability is {rep['max_break']:.2g} < {GATE_WARN:g}: "
                    "the gates are saturated, nothing will halt and the controller gets no gradient; "
                    "lower tpc.beta (or start from weights whose gate channels reach β/γ)")
        return {"start_max_break": rep["max_break"], "start_gate_channel_max": rep["gate_channel_max"],
                "gate_warning": rep["max_break"] < GATE_WARN}

    def run(self, hook: Optional[StepHook] = None) -> dict:
        d = self.d
        resumed = self.resume()
        if resumed and d.main:
            log(f"resuming {self.run_dir} after epoch {self.start_epoch}/{self.cfg.epochs}")
        gates = self.gate_report() if self.start_epoch == 0 else {}
        t0, final = time.perf_counter(), None
        for epoch in range(self.start_epoch, self.cfg.epochs):
            row = {"epoch": epoch, **self.train_epoch(epoch, hook)}
            last = epoch + 1 == self.cfg.epochs
            if (epoch + 1) % self.recipe.eval.every == 0 or last:  # the validation set may cost more than an epoch
                row.update(evaluate(self.model, self.val_loader, d, self.cfg, per_image=last))
                final = {k: v for k, v in row.items() if k in EVAL_KEYS or k.startswith("tokens_") or k == "macs"} \
                    if last else None
            if d.main:
                with (self.run_dir / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
                ckpt.save(self.ckpt_path, self.state(epoch + 1))
                log(epoch_line(epoch, self.cfg.epochs, row))
            distributed.barrier(d)
        if final is None:  # nothing trained here (resumed after the last epoch, or epochs: 0)
            final = evaluate(self.model, self.val_loader, d, self.cfg, per_image=True)
        if self.ema:
            final.update({f"{k}_ema": v for k, v in evaluate(self.ema.module, self.val_loader, d, self.cfg).items()
                          if k in ("top1", "top5")})
        final.update(epochs=self.cfg.epochs, resumed=resumed, train_duration_s=time.perf_counter() - t0, **gates)
        final.update(self._train_summary())
        return final

    def _train_summary(self) -> dict:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists() or not path.stat().st_size:
            return {}
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln]
        rates = [r["train_images_per_sec"] for r in rows if not math.isnan(r.get("train_images_per_sec", math.nan))]
        return {"final_train_loss": rows[-1]["loss"], "train_images_per_sec": sum(rates) / len(rates),
                "history_top1": [r.get("top1") for r in rows]}  # val top-1 after each epoch (Figure 4)
