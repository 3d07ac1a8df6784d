"""Checkpoints: written atomically, read without executing anything.

A checkpoint holds tensors and plain Python values only (RNG states as
tensors and lists), so `torch.load(..., weights_only=True)` reads it: a file
that needs code to be rebuilt is refused with one line, never unpickled.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpcrepro.errors import UserError

CHECKPOINT = "checkpoint.pt"
CONVERT_HINT = ("`tpcrepro convert-checkpoint FILE NEW_FILE` rewrites numpy values and argparse arguments as plain "
                "ones without executing anything; a file with other objects must be re-saved, from a source you trust, "
                "as its state dict")


# ---------------------------------------------------------------- RNG states as plain values

def _numpy_plain(state: tuple) -> dict:
    key, keys, pos, has_gauss, gauss = state
    return {"key": key, "state": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}


def _python_plain(state: tuple) -> dict:
    version, internal, gauss = state
    return {"version": version, "state": list(internal), "gauss_next": gauss}


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_plain(np.random.get_state()),
             "python": _python_plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- files

def save(path: Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over the old one."""
    from tpcrepro.records import atomic_write

    atomic_write(path, lambda f: torch.save(state, f), binary=True)


def safe_load(path: str | Path, fix: str = "delete the file", what: str = "") -> Any:
    """torch.load with weights_only=True; a file that would run code, or a damaged one, is a one-line UserError.

    `fix` says what to do with a damaged file (e.g. "pass --force to start the run over, or delete the file");
    `what` names what it was read for in that message (e.g. "weights from ").
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            what = next((ln.split("GLOBAL", 1)[1].split()[0] for ln in str(e).splitlines() if "GLOBAL" in ln), "")
            raise UserError(
                f"{path} contains objects that would have to be executed to load{f' ({what})' if what else ''}; "
                f"tpcrepro loads only tensors and plain values: {CONVERT_HINT}"
            ) from None
        detail = str(e).splitlines()[0][:120]
        raise UserError(f"cannot read {what}{path}: the file is damaged or not a PyTorch file ({detail}); {fix}") from None
    except Exception as e:  # the restricted unpickler runs nothing, so whatever else fails is a damaged file
        detail = (str(e).splitlines() or [""])[0].split(". ")[0][:120] or "it ends early"  # torch's first sentence
        raise UserError(f"cannot read {what}{path}: the file is damaged ({type(e).__name__}: {detail}); {fix}") from None


def load(path: Path, fix: str = "pass --force to start the run over, or delete the file") -> dict | None:
    """A run checkpoint, or None when there is none."""
    if not path.exists():
        return None
    state = safe_load(path, fix)
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a tpcrepro checkpoint (it holds a {type(state).__name__}); {fix}")
    return state


# ---------------------------------------------------------------- converting numpy and argparse values

def to_plain(obj: Any, where: str = "", dropped: list | None = None) -> Any:
    """Tensors and plain values from anything unpickled: numpy -> tensors, objects -> their attribute dicts."""
    dropped = [] if dropped is None else dropped
    if torch.is_tensor(obj) or obj is None or type(obj) in (bool, int, float, str, bytes):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy()) if obj.dtype != object else to_plain(obj.tolist(), where, dropped)
    if isinstance(obj, np.generic):  # before the plain types: np.float64 is a float subclass
        return obj.item()
    for plain in (bool, int, float, str, bytes):  # subclasses (enums, numpy scalars) pickle as their class
        if isinstance(obj, plain):
            return plain(obj)
    if isinstance(obj, dict):  # OrderedDict included
        return {k if isinstance(k, (str, int, float, bool)) else str(k): to_plain(v, f"{where}.{k}", dropped)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [to_plain(v, f"{where}[{i}]", dropped) for i, v in enumerate(obj)]
        return tuple(items) if type(obj) is tuple else items  # a namedtuple becomes a list
    if hasattr(obj, "__dict__") and not callable(obj):  # e.g. the argparse.Namespace in DeiT's training checkpoints
        return to_plain(vars(obj), where, dropped)
    dropped.append(f"{where.lstrip('.') or '<root>'} ({type(obj).__name__})")
    return None


def _data_globals() -> dict:
    """The globals a restricted unpickler may also call to rebuild numpy values and argparse arguments: data
    constructors only (numpy arrays, dtypes and scalars; argparse.Namespace), none of which can run other code."""
    import argparse

    core = getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core
    objs = [argparse.Namespace, np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar]
    objs += [c for c in vars(getattr(np, "dtypes", object)).values() if isinstance(c, type)]
    return {f"{o.__module__}.{o.__qualname__}": o for o in objs}


def convert(src: Path, dst: Path) -> list[str]:
    """Rewrite `src` (numpy values, argparse arguments, older tpcrepro RNG tuples) as tensors and plain values.

    Nothing in `src` is executed: it is read by torch's restricted unpickler with numpy's and argparse's data
    constructors allowed as well; a file naming any other global is refused. Returns what was dropped.
    """
    allowed = _data_globals()
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(src)
    except Exception:  # not a zip checkpoint: the safe load below says what is wrong
        needed = []
    others = [g for g in needed if g not in allowed]
    if others:
        raise UserError(f"{src} needs {', '.join(others[:3])} to load, which tpcrepro never executes; if you trust "
                        "its source, load it in your own Python (torch.load with weights_only off) and torch.save "
                        "its state dict")
    with torch.serialization.safe_globals(list(allowed.values())):
        obj = safe_load(src)
    if isinstance(obj, dict) and isinstance(obj.get("rng"), dict):  # a tpcrepro checkpoint of an older version
        rng = dict(obj["rng"])
        if isinstance(rng.get("numpy"), tuple):
            rng["numpy"] = _numpy_plain(rng["numpy"])
        if isinstance(rng.get("python"), tuple):
            rng["python"] = _python_plain(rng["python"])
        obj = {**obj, "rng": rng}
    dropped: list[str] = []
    plain = to_plain(obj, "", dropped)
    save(Path(dst), plain)
    safe_load(dst)  # what was written must load safely
    return dropped
