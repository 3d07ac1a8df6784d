"""Console output: rich progress bars on a terminal, plain lines elsewhere (logs, CI)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def log(msg: str, wrap: bool = True) -> None:
    """A console line (rich markup); wrap=False keeps it one line however long (a job's own output, copied)."""
    console.print(msg, highlight=False, soft_wrap=not wrap)


def bars_enabled() -> bool:
    return console.is_terminal and not os.environ.get("TPCREPRO_NO_PROGRESS")


class EpochProgress:
    """A bar per epoch with loss, lr, images/s and ETA; silent when not on a terminal."""

    def __init__(self, epoch: int, epochs: int, steps: int, enabled: bool = True):
        self.enabled = enabled and bars_enabled()
        self.desc = f"epoch {epoch + 1}/{epochs}"
        self.steps = steps
        self.progress = None

    def __enter__(self) -> "EpochProgress":
        if self.enabled:
            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
            )
            self.progress.__enter__()
            self.task = self.progress.add_task(self.desc, total=self.steps, loss=float("nan"), lr=0.0, ips=0.0)
        return self

    def update(self, loss: float, lr: float, images_per_sec: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=loss, lr=lr, ips=images_per_sec)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
