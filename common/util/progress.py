"""Progress bars for work a person waits for (assembly, transfers, training, evaluation)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


@contextmanager
def byte_progress(
    description: str, total: int, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield a callback that advances a bytes bar on stderr (silent when not enabled)."""
    if not enabled:
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=not sys.stderr.isatty(),
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


@contextmanager
def training_progress(
    total_steps: int, start: int, tokens_per_step: int, enabled: bool = True
) -> Iterator[Callable[[int, float], None]]:
    """Yield ``report(step, loss)`` driving a bar with step, loss, tokens/s and ETA."""
    if not enabled:
        yield lambda step, loss: None
        return
    progress = Progress(
        TextColumn("training"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=not sys.stderr.isatty(),
    )
    t0 = time.monotonic()
    with progress:
        task = progress.add_task("training", total=total_steps, completed=start, loss="-", tps="-")

        def report(step: int, loss: float) -> None:
            rate = (step - start) * tokens_per_step / max(1e-9, time.monotonic() - t0)
            progress.update(task, completed=step, loss=f"{loss:.4f}", tps=f"{rate:,.0f}")

        yield report


@contextmanager
def count_progress(
    description: str, total: int, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield a callback that advances a plain counting bar (documents, batches, experts)."""
    if not enabled:
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=not sys.stderr.isatty(),
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
