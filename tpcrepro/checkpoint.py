"""Checkpoints written atomically, with every state a resumed run needs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over the old one."""
    from tpcrepro.records import atomic_write

    atomic_write(path, lambda f: torch.save(state, f), binary=True)


def load(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
