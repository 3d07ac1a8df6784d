"""One job = one (recipe, kind, seed): train (or evaluate), flops or throughput -> one record.

This is what `tpcrepro job` runs, in this process or under torchrun.
"""

from __future__ import annotations

import time
import traceback
from contextlib import ExitStack
from pathlib import Path
from typing import Optional

import torch

from tpcrepro import checkpoint as ckpt
from tpcrepro import cpu
from tpcrepro import distributed, paths, records, runlock, speed, weights
from tpcrepro.errors import Interrupted, UserError
from tpcrepro.progress import log
from tpcrepro.models import api, method_kwargs
from tpcrepro.recipe import Recipe, load_recipe


def run_dir_for(recipe: Recipe, seed: int) -> Path:
    """runs/<recipe id>/<recipe hash>/s<seed>: a changed recipe gets a fresh directory."""
    return paths.runs_dir() / recipe.id / recipe.hash / f"s{seed}"


def _train(recipe: Recipe, seed: int, d: distributed.Dist, data_root: Optional[str], run_dir: Path,
           hook=None, progress: Optional[dict] = None) -> tuple[dict, dict]:
    from tpcrepro import data as data_mod
    from tpcrepro.train import Fit

    data_mod.resolve_root(recipe.data, data_root)  # a missing data directory is found before weights are fetched
    torch.manual_seed(seed)  # the same seed initialises the same weights on every rank
    model = weights.create(recipe.model, **method_kwargs(recipe))
    settings = {"world_size": d.world, "batch_size": recipe.train.batch_size, "epochs": recipe.train.epochs,
                "run_dir": str(run_dir), "data": recipe.data.dataset}
    if recipe.model.init_from:
        path = init_checkpoint(recipe.model.init_from, init_seed(recipe, seed))
        weights.load_weights(model, path)
        settings["init_from"] = str(path)
    if isinstance(model, api.Distilled):  # distillation from the frozen starting weights (DynamicViT)
        model.attach_teacher()
    fit = Fit(recipe, model, run_dir, d, data_root, seed)
    return fit.run(hook, progress), settings


def init_seed(recipe: Recipe, seed: int) -> int:
    """The seed of the run a fine-tuning starts from: model.init_seed, else the job's own."""
    return seed if recipe.model.init_seed is None else recipe.model.init_seed


def init_checkpoint(recipe_id: str, seed: int) -> Path:
    """The finished checkpoint of another recipe's run with the same seed (fine-tuning starts there)."""
    dep = load_recipe(recipe_id)
    path = run_dir_for(dep, seed) / "checkpoint.pt"
    state = ckpt.load(path, fix=f"run `tpcrepro run {recipe_id} --seeds {seed} --force` to train it again")
    if state is None or state.get("epoch", 0) < dep.train.epochs:
        raise UserError(f"model.init_from needs a finished run of {recipe_id} seed {seed} ({path}); "
                        f"run `tpcrepro run {recipe_id} --seeds {seed}` first")
    return path


def load_run_model(recipe_id: str, seed: int = 0, checkpoint: Optional[Path] = None) -> torch.nn.Module:
    """A recipe's model with the weights of its run (runs/<recipe>/<hash>/s<seed>/checkpoint.pt), in eval mode."""
    recipe = load_recipe(recipe_id)
    path = Path(checkpoint) if checkpoint else run_dir_for(recipe, seed) / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; run `tpcrepro run {recipe_id} --seeds {seed}` or pass checkpoint")
    model = static_model(recipe)
    weights.load_weights(model, path)
    return model.eval()


def static_model(recipe: Recipe) -> torch.nn.Module:
    m = recipe.model  # weights do not change a static count: skip loading them
    return weights.create(m.__class__(**{**m.__dict__, "pretrained": None}), **method_kwargs(recipe))


def _flops(recipe: Recipe) -> tuple[dict, dict]:
    """Params and static MACs; an adaptive model's per-image mean is in its train record."""
    from tpcrepro.measure import count_macs

    m = recipe.model
    shape = (m.in_chans, m.img_size, m.img_size)
    model = static_model(recipe)
    out = count_macs(model, shape, api.is_adaptive(model), recipe.stabilizer.kappa)
    settings = {"counter": out.pop("counter"), "note": out.pop("note"), "input_shape": list(shape), "batch": 1}
    return out, settings


def _throughput(recipe: Recipe, device: str) -> tuple[dict, dict]:
    m = recipe.model
    p = speed.Protocol.of(recipe.throughput, device)
    model = static_model(recipe)
    res = speed.compare({m.name: model}, (m.in_chans, m.img_size, m.img_size), p)[m.name]
    return {"images_per_sec": res["images_per_sec"], "latency_ms": res["latency_ms"]}, speed.settings(p)


def run_job(recipe: Recipe, kind: str, seed: int = 0, data_root: Optional[str] = None,
            run_dir: Optional[Path] = None, device: Optional[str] = None, force: bool = False,
            hook=None) -> Optional[records.Record]:
    """Run one job and write its record (rank 0). A failure or a stop by a signal writes a 'failed' record, then raises.

    A training job holds its run directory's lock throughout: a second job there stops at once, touching nothing.
    """
    d = distributed.init(device)
    run_dir = Path(run_dir) if run_dir else run_dir_for(recipe, seed)
    with ExitStack() as stack:
        busy = None
        if kind == "train" and d.main:
            try:
                stack.enter_context(runlock.hold(run_dir))
            except UserError as e:
                busy = e
        if kind == "train" and d.world > 1 and distributed.all_sum([float(busy is not None)], d)[0]:
            raise busy or UserError(f"{run_dir} is in use by another job; wait for it or pass --run-dir elsewhere")
        if busy:
            raise busy
        if d.device == "cpu":  # the recipe's threads (smoke pins them: a CPU run's bits depend on them)
            stack.enter_context(cpu.threads(recipe.train.threads))
        return _run_held(recipe, kind, seed, d, data_root, run_dir, force, hook)


def _clean_run_dir(run_dir: Path, force: bool) -> None:
    """With the lock held: drop temp files a killed write left, and with force the checkpoint and curve."""
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    if force:  # start over: drop this run's checkpoint and curve, nothing else
        for name in ("checkpoint.pt", "metrics.jsonl"):
            (run_dir / name).unlink(missing_ok=True)


def _run_held(recipe: Recipe, kind: str, seed: int, d: distributed.Dist, data_root: Optional[str], run_dir: Path,
              force: bool, hook) -> Optional[records.Record]:
    if d.main and kind == "train":
        _clean_run_dir(run_dir, force)
    distributed.barrier(d)
    run_dir.mkdir(parents=True, exist_ok=True)
    started, t0 = records.now_iso(), time.perf_counter()
    status, error, metrics, settings = "done", None, {}, {}
    progress: dict = {}
    try:
        if kind == "train":
            metrics, settings = _train(recipe, seed, d, data_root, run_dir, hook, progress)
        elif kind == "flops":
            metrics, settings = _flops(recipe)
        elif kind == "throughput":
            metrics, settings = _throughput(recipe, d.device)
        else:
            raise UserError(f"unknown job kind '{kind}' (train, flops, throughput)")
        settings.setdefault("data", recipe.data.dataset)  # the report never mixes data sets in one column
    except UserError as e:
        status, error = "failed", str(e)
    except (KeyboardInterrupt, Interrupted) as e:  # Ctrl-C or SIGTERM: record where it stopped, then stop with one line
        where = (f"after epoch {progress.get('epoch', 0)} of {recipe.train.epochs}" if kind == "train"
                 else f"during {recipe.id} {kind}")
        again = "resumes" if kind == "train" else "runs it again"
        message = f"interrupted {where}; the same command {again}"
        if d.main:
            _write(recipe, kind, seed, "failed", {}, {}, d, started, t0, message)
        if isinstance(e, Interrupted):
            raise Interrupted(e.signum, message) from None
        raise
    except Exception as e:  # anything else: keep the traceback beside the run, say where it is
        status, error = "failed", f"{type(e).__name__}: {e}"
        (run_dir / f"{kind}_error.log").write_text(traceback.format_exc())
        error += f" (traceback in {run_dir / f'{kind}_error.log'})"
    if not d.main:
        if error:
            raise UserError(error)
        return None
    rec, path = _write(recipe, kind, seed, status, metrics, settings, d, started, t0, error)
    if status == "failed":
        raise UserError(f"{recipe.id} {kind} failed: {error}")
    log(f"[green]done[/] {recipe.id} {kind} seed {seed} -> {path.relative_to(paths.ROOT) if path.is_relative_to(paths.ROOT) else path}")
    return rec


def _write(recipe: Recipe, kind: str, seed: int, status: str, metrics: dict, settings: dict, d: distributed.Dist,
           started: str, t0: float, error: Optional[str]) -> tuple[records.Record, Path]:
    rec = records.new(recipe.id, recipe.hash, recipe.profile, kind, seed=seed, status=status, metrics=metrics,
                      settings=settings, overrides=recipe.overrides, device=d.device, started_at=started,
                      duration_s=round(time.perf_counter() - t0, 3), error=error)
    return rec, records.write_record(rec)
