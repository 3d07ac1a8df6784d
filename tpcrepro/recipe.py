"""Recipes: YAML files validated into frozen dataclasses.

A recipe may name a `base:` file, which may name its own (a chain, up to
four deep, no cycles): a variant states only what it changes. Unknown or
mistyped keys are errors naming the key and the file. `--set a.b=v` overrides
are applied after the base merge and are part of the recipe's hash.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import os
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from tpcrepro import methods, paths
from tpcrepro.errors import UserError
from tpcrepro.scenes import ScenesCfg

PROFILES = ("smoke", "paper")
JOB_KINDS = ("train", "flops", "throughput")
DATASETS = ("imagenet", "folder", "digits", "scenes")


@dataclass(frozen=True)
class ModelCfg:
    name: str = "deit_small_patch16_224"
    pretrained: Optional[str] = None  # null | "hub" | path to a checkpoint file ($VARS expanded)
    backbone: Optional[str] = None  # timm name whose hub weights `pretrained: hub` loads (adaptive models)
    init_from: Optional[str] = None  # recipe id: start from that recipe's finished run of the same seed
    init_seed: Optional[int] = None  # with init_from: start from this seed's run instead (one pretrained backbone for all)
    num_classes: int = 1000
    img_size: int = 224
    in_chans: int = 3
    drop_path: float = 0.0
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass(frozen=True)
class AugCfg:
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.3
    hflip: float = 0.5
    re_prob: float = 0.25
    re_mode: str = "pixel"
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.1
    repeated_aug: bool = False
    translate: int = 0  # random shift in pixels (small images only)


@dataclass(frozen=True)
class DataCfg:
    dataset: str = "imagenet"  # imagenet | folder | digits | scenes
    root: Optional[str] = None  # ImageFolder root with train/ and val/; else $TPCREPRO_DATA
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    workers: int = 8
    subset_train: Optional[int] = None  # use only the first N training images (a fixed sample)
    token_labels: Optional[str] = None  # LV-ViT token labeling: folder of teacher score maps mirroring train/
    token_label_weight: float = 0.5  # weight of the dense (per-token) loss
    mixtoken: bool = True  # with token_labels: MixToken (replaces mixup and cutmix)
    subset_val: Optional[int] = None
    aug: AugCfg = field(default_factory=AugCfg)
    scenes: ScenesCfg = field(default_factory=ScenesCfg)  # dataset: scenes (tpcrepro/scenes.py)


@dataclass(frozen=True)
class TrainCfg:
    epochs: int = 300  # 0 = evaluate the initial weights only
    batch_size: int = 1024  # global, split over processes
    optimizer: str = "adamw"  # adamw | adam
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    clip_grad: Optional[float] = None
    amp: bool = True  # autocast on CUDA only
    amp_dtype: str = "bf16"  # bf16 | fp16 (fp16 adds a gradient scaler)
    ema: bool = False
    ema_decay: float = 0.99996
    # CPU threads of a job on the CPU (None: torch's default). Smoke recipes pin it: the bits of a CPU run depend
    # on it, and `run --jobs` packs jobs onto cores by it. Not hashed (like data.workers); records keep it.
    threads: Optional[int] = None


@dataclass(frozen=True)
class EvalCfg:
    batch_size: int = 256
    every: int = 1  # evaluate after every N-th epoch during training (and always after the last); 0: the last only
    # The evaluations before the last on the first N validation images only: the training curve (Figure 4,
    # the record's history_top1) at a fraction of a full evaluation. The last evaluation is on every image,
    # and the curve's last point is read from its hits on the same first N. None: every evaluation on all.
    curve_size: Optional[int] = None


@dataclass(frozen=True)
class ThroughputCfg:
    """A `throughput` job's timing settings: the fields of speed.Protocol, which adds the device and compile."""

    batch_size: int = 256
    precision: str = "bf16"  # bf16 | fp32
    warmup: int = 10
    steps: int = 30
    repeats: int = 5


@dataclass(frozen=True)
class StabilizerCfg:
    kappa: Optional[int] = None  # top-κ attention; null = dense
    train_only: bool = False  # true: top-κ while training, dense attention at inference (TPC and A-ViT models)

    def __post_init__(self):
        if self.kappa is not None and self.kappa < 1:
            raise ValueError(f"stabilizer.kappa must be at least 1 (or null for dense attention), got {self.kappa}")


class _RecipeMethods:
    @functools.cached_property
    def hash(self) -> str:  # computed once per recipe (a frozen dataclass: it cannot change)
        return recipe_hash(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The recipe's sections in order; each method's own section (tpcrepro.methods: tpc, also A-ViT's configuration
# of the same controller, evit, dynamicvit, tome) comes from the methods table, so a new method adds none here.
_FIELDS = [
    ("profile", str),
    ("description", str, field(default="")),
    ("seed", int, field(default=0)),
    ("jobs", tuple, field(default=("train", "flops"))),
    # stated cost of all its jobs in A100-class GPU-hours (`run --dry-run` sums)
    ("cost_gpu_hours", Optional[float], field(default=None)),
    ("model", ModelCfg, field(default_factory=ModelCfg)),
    ("data", DataCfg, field(default_factory=DataCfg)),
    ("train", TrainCfg, field(default_factory=TrainCfg)),
    ("eval", EvalCfg, field(default_factory=EvalCfg)),
    ("throughput", ThroughputCfg, field(default_factory=ThroughputCfg)),
    *[(name, cfg, field(default_factory=cfg)) for name, cfg in methods.sections().items()],
    ("stabilizer", StabilizerCfg, field(default_factory=StabilizerCfg)),
    # Filled by the loader, not by YAML.
    ("id", str, field(default="")),
    ("overrides", tuple, field(default=())),
]
Recipe = dataclasses.make_dataclass("Recipe", _FIELDS, bases=(_RecipeMethods,), frozen=True)
Recipe.__module__ = __name__  # pickles as tpcrepro.recipe.Recipe
Recipe.__doc__ = "A validated recipe: the sections above, each a frozen dataclass of its keys."


def _non_default(d: dict, default: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and isinstance(default.get(k), dict):
            sub = _non_default(v, default[k])
            if sub:
                out[k] = sub
        elif k not in default or default[k] != v:
            out[k] = v
    return out


# Settings that change no number a job reports (the throughput settings are kept in its record).
_UNHASHED = ("description", "id", "overrides", "seed", "jobs", "eval", "throughput", "cost_gpu_hours")


def recipe_hash(recipe: Recipe) -> str:
    """Hash of the settings that differ from the defaults and change results.

    Hashing only what differs keeps hashes stable when new keys with
    defaults are added (the code version is in every record's git commit).
    A recipe fine-tuned from another (`model.init_from`) includes that one's
    hash: retraining the base makes it stale too.
    """
    d = _non_default(recipe.to_dict(), Recipe(profile=recipe.profile).to_dict())
    for key in _UNHASHED:
        d.pop(key, None)
    d.get("data", {}).pop("workers", None)
    if d.get("train", {}).pop("threads", None) is not None and not d["train"]:
        d.pop("train")  # a section that differed only in its threads hashes as if it had not
    if recipe.model.init_from:
        d["init_from_hash"] = load_recipe(recipe.model.init_from).hash
    blob = json.dumps(d, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ---------------------------------------------------------------- loading

def recipe_path(recipe_id: str) -> Path:
    p = Path(recipe_id)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p.resolve()
    return paths.recipes_dir() / f"{recipe_id}.yaml"


def recipe_id_of(path: Path) -> str:
    try:
        rel = path.resolve().relative_to(paths.recipes_dir().resolve())
        return str(rel.with_suffix(""))
    except ValueError:
        return str(path.with_suffix(""))


_yaml_read: dict[str, tuple[tuple, dict]] = {}  # path -> ((inode, size, mtime), its mapping): a shared base is read once


def _read_yaml(path: Path) -> dict:
    """The file's mapping (a fresh copy: the loader changes it)."""
    if not path.exists():
        raise UserError(f"recipe file {path} does not exist; see `tpcrepro recipes` for the available ids")
    st = path.stat()
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _yaml_read.get(str(path))
    if hit is not None and hit[0] == sig:
        return copy.deepcopy(hit[1])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of recipe keys")
    _yaml_read[str(path)] = (sig, data)
    return copy.deepcopy(data)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like section.key=value, e.g. train.lr=1e-3")
    key, _, raw = text.partition("=")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML reads 1e-3 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> dict:
    out = dict(data)
    node = out
    for k in keys[:-1]:
        node[k] = dict(node.get(k) or {})
        node = node[k]
    node[keys[-1]] = value
    return out


MAX_BASE_DEPTH = 4


_loaded: dict[tuple, tuple[tuple, Recipe]] = {}  # (path, overrides, recipes dir) -> (its files' stats, recipe)
_loading: set = set()  # the recipes whose init_from is being loaded (a loop of init_from stops there)


def _stats(chain: list[Path]) -> tuple:
    """What tells whether a recipe's files changed: each one's inode, size and mtime."""
    out = []
    for p in chain:
        try:
            st = os.stat(p)
        except OSError:
            return ()
        out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_recipe(recipe_id: str, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """The recipe, base chain merged and overrides applied; read once per process while its files stay the same."""
    path = recipe_path(recipe_id)
    key = (str(path), tuple(overrides), str(paths.recipes_dir()))
    hit = _loaded.get(key)
    if hit is not None and hit[0] and _stats([Path(p) for p, *_ in hit[0]]) == hit[0]:
        return hit[1]
    recipe, chain = _load(path, tuple(overrides))
    stats = _stats(chain)
    dep_key = (str(recipe_path(recipe.model.init_from)), (), str(paths.recipes_dir())) if recipe.model.init_from else None
    if dep_key and stats:  # its hash includes the base run's recipe: a change there counts too
        if dep_key != key and dep_key not in _loading:
            _loading.add(key)
            try:
                load_recipe(recipe.model.init_from)
            finally:
                _loading.discard(key)
        dep = _loaded.get(dep_key)
        stats = stats + dep[0] if dep and dep[0] else ()  # () is never equal to a fresh stat: not cached
    _loaded[key] = (stats, recipe)
    return recipe


def _load(path: Path, overrides: tuple[str, ...]) -> tuple[Recipe, list[Path]]:
    data = _read_yaml(path)
    chain, here = [path.resolve()], path
    while (base_name := data.pop("base", None)) is not None:
        base_path = (here.parent / base_name) if not Path(base_name).is_absolute() else Path(base_name)
        if not base_path.exists():
            base_path = paths.recipes_dir() / base_name
        if base_path.resolve() in chain or len(chain) > MAX_BASE_DEPTH:
            raise UserError(f"{path}: the chain of base files loops or is deeper than {MAX_BASE_DEPTH} "
                            f"({' -> '.join(p.name for p in chain)} -> {base_path.name}); shorten it")
        chain.append(base_path.resolve())
        data = deep_merge(_read_yaml(base_path), data)
        here = base_path
    for text in overrides:
        keys, value = parse_override(text)
        data = _apply_override(data, keys, value)
    recipe = build(Recipe, data, str(path), prefix="")
    return dataclasses.replace(recipe, id=recipe_id_of(path), overrides=tuple(overrides)), chain


# ---------------------------------------------------------------- validation

def _check_scalar(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_scalar(args[0], value, where)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    if tp is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if tp is dict and isinstance(value, dict):
        return value
    name = getattr(tp, "__name__", str(tp))
    raise UserError(f"{where} must be {name}, got {value!r}")


def build(cls: type, data: dict, source: str, prefix: str) -> Any:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.')}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name not in ("id", "overrides")}
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + unknown[0]
        raise UserError(f"{source}: unknown recipe key '{key}' (valid here: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        where = f"{source}: '{prefix}{name}'"
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value or {}, source, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _check_scalar(tp, value, where)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{source}: {e}") from None
    _validate(obj, source)
    _check_ranges(obj, source, prefix)
    return obj


# (low, high, low_open, high_open); None = unbounded. Checked when a value enters, one line naming the key.
_GE0, _GE1, _GT0, _UNIT = methods.GE0, methods.GE1, methods.GT0, methods.UNIT
RANGES: dict[type, dict[str, tuple]] = {
    ModelCfg: {"num_classes": _GE1, "img_size": _GE1, "in_chans": _GE1, "drop_path": _UNIT},
    AugCfg: {"color_jitter": _GE0, "hflip": _UNIT, "re_prob": _UNIT, "mixup": _GE0, "cutmix": _GE0,
             "mixup_prob": _UNIT, "switch_prob": _UNIT, "smoothing": (0, 1, False, True), "translate": _GE0},
    DataCfg: {"crop_pct": (0, 1, True, False), "workers": _GE0, "subset_train": _GE1, "subset_val": _GE1,
              "token_label_weight": _GE0},
    TrainCfg: {"epochs": _GE0, "batch_size": _GE1, "lr": _GT0, "weight_decay": _GE0, "warmup_epochs": _GE0,
               "warmup_lr": _GE0, "min_lr": _GE0, "clip_grad": _GT0, "ema_decay": _UNIT, "threads": _GE1},
    EvalCfg: {"batch_size": _GE1},
    ThroughputCfg: {"batch_size": _GE1, "warmup": _GE0, "steps": _GE1, "repeats": _GE1},
    StabilizerCfg: {"kappa": _GE1},
    **methods.ranges(),
}


def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '≥'} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def _check_ranges(obj: Any, source: str, prefix: str) -> None:
    for name, (lo, hi, lo_open, hi_open) in RANGES.get(type(obj), {}).items():
        v = getattr(obj, name)
        if v is None or not isinstance(v, (int, float)):
            continue
        ok = (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            raise UserError(f"{source}: '{prefix}{name}' must be {_range_text(lo, hi, lo_open, hi_open)}, got {v!r}")
    if isinstance(obj, TrainCfg) and obj.epochs > 0 and obj.warmup_epochs > obj.epochs:
        raise UserError(f"{source}: '{prefix}warmup_epochs' ({obj.warmup_epochs}) must not exceed "
                        f"'{prefix}epochs' ({obj.epochs}); set {prefix}warmup_epochs={obj.epochs} or less")


def _validate(obj: Any, source: str) -> None:
    if isinstance(obj, Recipe):
        if obj.profile not in PROFILES:
            raise UserError(f"{source}: 'profile' must be one of {PROFILES}, got {obj.profile!r}")
        bad = [j for j in obj.jobs if j not in JOB_KINDS]
        if bad:
            raise UserError(f"{source}: 'jobs' has unknown kind {bad[0]!r} (valid: {', '.join(JOB_KINDS)})")
    if isinstance(obj, DataCfg) and obj.dataset not in DATASETS:
        raise UserError(f"{source}: 'data.dataset' must be one of {', '.join(DATASETS)}, got {obj.dataset!r}")
    if isinstance(obj, EvalCfg) and obj.every < 0:
        raise UserError(f"{source}: 'eval.every' must be 0 (after the last epoch only) or more, got {obj.every}")
    if isinstance(obj, EvalCfg) and obj.curve_size is not None and obj.curve_size < 1:
        raise UserError(f"{source}: 'eval.curve_size' must be at least 1 (or null: every image), got {obj.curve_size}")
    if isinstance(obj, TrainCfg) and obj.optimizer not in ("adam", "adamw"):
        raise UserError(f"{source}: 'train.optimizer' must be adam or adamw, got {obj.optimizer!r}")
    if isinstance(obj, TrainCfg) and obj.amp_dtype not in ("bf16", "fp16"):
        raise UserError(f"{source}: 'train.amp_dtype' must be bf16 or fp16, got {obj.amp_dtype!r}")
    if isinstance(obj, ThroughputCfg) and obj.precision not in ("bf16", "fp32"):
        raise UserError(f"{source}: 'throughput.precision' must be bf16 or fp32, got {obj.precision!r}")


def list_recipes() -> list[str]:
    root = paths.recipes_dir()
    return sorted(
        recipe_id_of(p) for p in root.rglob("*.yaml") if not p.relative_to(root).parts[0].startswith("_")
    )
