"""One job per run directory: an flock held while a job runs, with the holder's PID written inside.

The kernel drops an flock when its process ends, however it ends, so a lock
left by a killed job never blocks the next one; the file itself stays.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tpcrepro.errors import UserError

LOCK = ".lock"


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold run_dir's lock for the block, or raise UserError at once naming the directory and the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's PID is in there
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise UserError(f"{run_dir} is in use by another job (pid {holder}); wait for it to finish, stop it, "
                            "or pass --run-dir elsewhere") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock
