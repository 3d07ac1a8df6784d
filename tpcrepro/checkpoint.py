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
CONVERT_HINT = "if you trust its source, `tpcrepro convert-checkpoint FILE NEW_FILE --trust` rewrites it as a safe file"


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


# ---------------------------------------------------------------- converting a trusted file

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


def convert_trusted(src: Path, dst: Path) -> list[str]:
    """Load `src` with full unpickling (runs its code: trusted files only), write `dst` safe. Returns what was dropped."""
    obj = torch.load(src, map_location="cpu", weights_only=False)
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
