"""fit / evaluate: one loop for every model, single process or DDP through torchrun.

A run directory holds `checkpoint.pt` (written atomically after every epoch,
with optimizer, scheduler, scaler, EMA and RNG state, and the epoch rows so far)
and `metrics.jsonl` (one line per epoch). A run directory with a checkpoint
resumes from it. The checkpoint is the truth: every start rewrites
`metrics.jsonl` from the rows it holds (none without a checkpoint), so a kill
at any moment leaves exactly one row per finished epoch.
Every model's forward returns logits; a model with token statistics or loss
terms of its own (tpcrepro.models.api.WithStats) reports them through
`forward_with_stats` -> {"logits", "stats", "losses"} (named, already weighted
loss terms added to the task loss), which the loop calls through
`api.stats_forward`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
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
from tpcrepro.models import api
from tpcrepro.progress import EpochProgress, log
from tpcrepro.recipe import Recipe, TrainCfg
from tpcrepro.stats import StatSum

EVAL_KEYS = ("top1", "top5", "n_val", "val_skipped", "correct_top1")  # what evaluate() gives besides token stats
GATE_WARN = 1e-6  # below this largest break probability the controller cannot learn
StepHook = Callable[[int, int], None]  # (epoch, step) -> None; may raise to stop
TEST_AT_ENV = "TPCREPRO_TEST_AT"  # tests only: "POINT:EPOCH:ACTION", e.g. before_ckpt:0:exit (see _test_point)
TIME_KEYS = ("train_images_per_sec",)  # row fields that measure the machine, not the run


def _test_point(point: str, epoch: int) -> None:
    """Fault injection for the tests: at `point` of `epoch` (before_ckpt | after_ckpt | step), exit at once
    like a kill -9 (ACTION exit) or say so on stderr and wait to be signalled (ACTION wait)."""
    spec = os.environ.get(TEST_AT_ENV)
    if not spec:
        return
    want, at, action = spec.split(":")
    if want == point and int(at) == epoch:
        if action == "exit":
            os._exit(9)
        print(f"test point {point}:{epoch} reached (pid {os.getpid()})", file=sys.stderr, flush=True)
        time.sleep(600)


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
    first_bad = None
    token_stats = StatSum()
    hits1: list[torch.Tensor] = []
    ctx = autocast(cfg, d.device) if cfg else nullcontext()
    for x, y, bad in loader:
        skipped += len(bad)
        first_bad = first_bad or (bad[0] if bad else None)
        if x is None:
            continue
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with ctx:
            out = api.stats_forward(model, x)
        logits = out["logits"]
        token_stats.add(out["stats"])
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
    if first_bad:
        out["val_skipped_first"] = first_bad
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
    named = model.optimizer_groups() if isinstance(model, api.GroupedLR) else {
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
        if self.token_labels and not isinstance(model, api.TokenLabeled):
            raise UserError(f"data.token_labels trains an aux head per token; {recipe.model.name} has none (use LV-ViT)")
        grid = tuple(model.patch_embed.grid_size) if hasattr(model, "patch_embed") else None
        ds = data_mod.build_datasets(recipe.data, recipe.model, data_root, token_grid=grid, seed=seed)
        self.num_classes = ds.num_classes
        workers = recipe.data.workers
        self.train_loader = data_mod.train_loader(ds.train, cfg.batch_size // d.world, workers,
                                                  recipe.data.aug, seed, d.rank, d.world)
        self.val_loader = data_mod.eval_loader(ds.val, recipe.eval.batch_size // d.world or 1, workers, d.rank, d.world)
        self.curve_size = min(recipe.eval.curve_size or len(ds.val), len(ds.val))  # the training curve's images
        self.curve_loader = self.val_loader if self.curve_size == len(ds.val) else data_mod.eval_loader(
            torch.utils.data.Subset(ds.val, range(self.curve_size)), recipe.eval.batch_size // d.world or 1, workers,
            d.rank, d.world)
        self.mixup = None if self.token_labels else data_mod.mixup_fn(recipe.data.aug, ds.num_classes)
        self.criterion = criterion_for(recipe.data.aug, self.mixup is not None)
        self.model = model.to(d.device)
        stats = api.StatsForward(self.model)  # DDP wraps the stats forward, so it sees every training forward
        self.ddp = (torch.nn.parallel.DistributedDataParallel(stats, device_ids=[d.local_rank]
                    if d.device.startswith("cuda") else None) if d.world > 1 else stats)
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
        self.history: list[dict] = []  # one row per finished epoch, saved in the checkpoint
        self._warned_splits: set = set()

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
            "history": list(self.history),
        }

    def resume(self) -> bool:
        """Load the checkpoint if there is one; either way make metrics.jsonl hold exactly its epochs' rows."""
        state = ckpt.load(self.ckpt_path)
        if state is None:
            self._write_metrics([])
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
        self.history = list(state["history"]) if "history" in state else self._rows_on_disk(self.start_epoch)
        self._write_metrics(self.history)
        return True

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def _rows_on_disk(self, epochs_done: int) -> list[dict]:
        """For a checkpoint that predates saved rows: the last row per finished epoch in metrics.jsonl."""
        rows: dict[int, dict] = {}
        if self.metrics_path.exists():
            for ln in self.metrics_path.read_text().splitlines():
                try:
                    row = json.loads(ln)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] < epochs_done:
                    rows[row["epoch"]] = row
        return [rows[e] for e in sorted(rows)]

    def _write_metrics(self, rows: list[dict]) -> None:
        if self.d.main and (rows or self.metrics_path.exists()):
            from tpcrepro.records import atomic_write_text

            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

    # -- loop
    def train_epoch(self, epoch: int, hook: Optional[StepHook]) -> dict:
        d = self.d
        self.ddp.train()
        if isinstance(self.model, api.EpochScheduled):  # schedules inside a method (EViT's keep-rate warm-up)
            self.model.set_epoch(epoch)
        if isinstance(self.model, api.GroupedLR):  # per-group lr (DynamicViT: backbone 0.01x, frozen at first)
            for g in self.optimizer.param_groups:
                g["lr_scale"] = self.model.lr_scale(g["name"], epoch)
            # The scheduler applies lr_scale when it sets a group's lr, and it last did so after the previous
            # epoch's final step (or, for the first epoch, never): set the lr again now, or the epoch's first
            # step runs at the old scale (a frozen backbone's first step at the predictors' full lr).
            self.scheduler.step_update(epoch * self.steps_per_epoch)
        _seed_epoch(self.seed, epoch, d.rank)
        data_mod.set_epoch(self.train_loader.dataset, epoch)  # scenes: this epoch's fresh draws
        if hasattr(self.train_loader.sampler, "set_epoch"):  # the offset gives each seed its own order
            self.train_loader.sampler.set_epoch(epoch + 100003 * self.seed)
        sums: dict[str, float] = {}
        token_stats = StatSum()
        images, skipped, first_bad, t0 = 0, 0, None, time.perf_counter()
        with EpochProgress(epoch, self.cfg.epochs, self.steps_per_epoch, enabled=d.main) as bar:
            for step, (x, y, bad) in enumerate(self.train_loader):
                skipped += len(bad)
                first_bad = first_bad or (bad[0] if bad else None)
                if step == 0:
                    _test_point("step", epoch)
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
        if first_bad:
            out["train_skipped_first"] = first_bad
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
        out = self.ddp(x, box=box, token_labels=True)
        task = tl.token_label_loss(out["logits"], out["aux_tokens"], target, dense, data.token_label_weight)
        return task, out["losses"], out["stats"]

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
                out = self.ddp(x)
                losses, stats = out["losses"], out["stats"]
                task = self.criterion(out["logits"].float(), y)
            loss = task + sum(losses.values()) if losses else task
        bad = not bool(torch.isfinite(loss))
        if d.world > 1:  # every rank must stop together, or the others hang in the next all-reduce
            bad = distributed.all_sum([float(bad)], d)[0] > 0
        if bad:
            kept = (f"the checkpoint after epoch {epoch} in {self.run_dir} is kept" if self.ckpt_path.exists()
                    else "no checkpoint was written before it")
            raise UserError(f"loss is {loss.item()} at epoch {epoch} step {step}; lower train.lr or set "
                            f"train.clip_grad ({kept})")
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
        if not api.is_adaptive(self.model):
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

    def _warn_skipped(self, split: str, row: dict) -> None:
        """One console line per split the first time it skips unreadable images (count and first path)."""
        n, first = row.get(f"{split}_skipped", 0), row.get(f"{split}_skipped_first")
        if n and self.d.main and split not in self._warned_splits:
            self._warned_splits.add(split)
            print(f"warning: skipped {n} unreadable image(s) in the {split} split (first: {first}); "
                  f"the metrics count them ({split}_skipped)", file=sys.stderr, flush=True)

    def run(self, hook: Optional[StepHook] = None, progress: Optional[dict] = None) -> dict:
        """Train from the checkpoint (or the start) to the last epoch; `progress['epoch']` tracks epochs saved."""
        d = self.d
        progress = {} if progress is None else progress
        resumed = self.resume()
        progress["epoch"] = self.start_epoch
        if resumed and d.main:
            log(f"resuming {self.run_dir} after epoch {self.start_epoch}/{self.cfg.epochs}")
        gates = self.gate_report() if self.start_epoch == 0 else {}
        t0, final = time.perf_counter(), None
        for epoch in range(self.start_epoch, self.cfg.epochs):
            row = {"epoch": epoch, **self.train_epoch(epoch, hook)}
            last = epoch + 1 == self.cfg.epochs
            every = self.recipe.eval.every
            if last:
                row.update(evaluate(self.model, self.val_loader, d, self.cfg, per_image=True))
                row["curve_top1"] = self._curve_point(row)
                final = {k: v for k, v in row.items() if k in EVAL_KEYS or k.startswith("tokens_") or k == "macs"}
            elif every and (epoch + 1) % every == 0:  # the training curve: on its first curve_size images
                row.update(evaluate(self.model, self.curve_loader, d, self.cfg))
                row["curve_top1"] = row["top1"]
            self.history.append(row)
            if d.main:  # checkpoint first: it holds the row, and metrics.jsonl is rebuilt from it on a restart
                _test_point("before_ckpt", epoch)
                ckpt.save(self.ckpt_path, self.state(epoch + 1))
                _test_point("after_ckpt", epoch)
                with self.metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                log(epoch_line(epoch, self.cfg.epochs, row))
                self._warn_skipped("train", row)
                self._warn_skipped("val", row)
            progress["epoch"] = epoch + 1
            distributed.barrier(d)
        if final is None:  # nothing trained here (resumed after the last epoch, or epochs: 0)
            final = evaluate(self.model, self.val_loader, d, self.cfg, per_image=True)
        if self.ema:
            final.update({f"{k}_ema": v for k, v in evaluate(self.ema.module, self.val_loader, d, self.cfg).items()
                          if k in ("top1", "top5")})
        final.update(epochs=self.cfg.epochs, resumed=resumed, train_duration_s=time.perf_counter() - t0, **gates)
        final.update(self._train_summary())
        return final

    def _curve_point(self, row: dict) -> Optional[float]:
        """The training curve's point of the last evaluation: top-1 on its first curve_size images (from the hits)."""
        if self.curve_size == row.get("n_val"):
            return row["top1"]
        if "correct_top1" not in row:  # skipped images: no per-image hits to read the first ones from
            return None
        return 100.0 * float(unpack_correct(row["correct_top1"], row["n_val"])[: self.curve_size].mean())

    def _train_summary(self) -> dict:
        rows = self.history
        if not rows:
            return {}
        rates = [r["train_images_per_sec"] for r in rows if not math.isnan(r.get("train_images_per_sec", math.nan))]
        return {"final_train_loss": rows[-1]["loss"], "train_images_per_sec": sum(rates) / len(rates),
                "history_top1": [r.get("curve_top1", r.get("top1")) for r in rows],  # the training curve (Figure 4)
                "history_n_val": self.curve_size}
