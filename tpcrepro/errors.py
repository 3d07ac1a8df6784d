"""The exceptions the CLI turns into one line: a fixable problem, or a stop by a signal."""

from __future__ import annotations

import os
import signal


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""


class Interrupted(BaseException):
    """Stopped by SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's time limit); the CLI exits 128 + signal.

    A BaseException like KeyboardInterrupt, so `except Exception` handlers let it through and cleanups
    (atomic writes, `finally`) run; not a KeyboardInterrupt, which typer turns into a silent exit code.
    """

    def __init__(self, signum: int = signal.SIGINT, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}; what was written so far is "
                                    "kept and the same command goes on from there")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def raise_on_signals() -> None:
    """SIGINT and SIGTERM raise Interrupted in this process (SIGTERM would otherwise end it without a word).

    Forked children (data loader workers) inherit the handler; there it raises KeyboardInterrupt, which
    torch's workers handle quietly, and the main process reports.
    """
    owner = os.getpid()

    def handler(signum, _frame):
        if os.getpid() != owner:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
