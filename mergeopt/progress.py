"""Progress of long-running work, one bar per stage: rich bars on a terminal, plain timestamped
lines otherwise (SLURM logs, nohup, CI), so a job that runs for minutes is never silent."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

Advance = Callable[[], None]


class Stages:
    """Stages of one job, each with a known number of steps.

    ``begin(description, total)`` opens a stage and returns its ``advance`` callback; the
    previous stage is closed. Plain mode writes a line when a stage begins, every
    ``interval`` seconds while it runs, and when it ends.
    """

    def __init__(self, *, stream: TextIO, rich: Any | None, interval: float) -> None:
        self._stream = stream
        self._rich = rich
        self._interval = interval
        self._task: Any = None
        self._description = ""
        self._total = 0
        self._done = 0
        self._started = 0.0
        self._last_line = 0.0

    def begin(self, description: str, total: int) -> Advance:
        self.end()
        self._description, self._total, self._done = description, total, 0
        self._started = self._last_line = time.monotonic()
        if self._rich is not None:
            self._task = self._rich.add_task(description, total=total)
        else:
            self._line(f"{description}: started ({total} steps)")
        return self._advance

    def end(self) -> None:
        """Close the open stage, if any."""
        if not self._description:
            return
        if self._rich is None:
            seconds = time.monotonic() - self._started
            self._line(f"{self._description}: done in {seconds:.0f} s")
        self._description = ""

    def _advance(self) -> None:
        self._done += 1
        if self._rich is not None:
            self._rich.advance(self._task)
            return
        now = time.monotonic()
        if now - self._last_line >= self._interval and self._done < self._total:
            self._last_line = now
            percent = 100 * self._done / max(1, self._total)
            self._line(
                f"{self._description}: {self._done}/{self._total} ({percent:.0f}%), "
                f"{now - self._started:.0f} s"
            )

    def _line(self, text: str) -> None:
        self._stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self._stream.flush()


@contextmanager
def stages(
    enabled: bool = True, *, stream: TextIO | None = None, interval: float = 15.0
) -> Iterator[Stages]:
    """A :class:`Stages` reporter: rich bars when ``stream`` is a terminal, plain lines when it
    is not, nothing when ``enabled`` is false."""
    out = stream or sys.stderr
    if not enabled:
        from io import StringIO

        yield Stages(stream=StringIO(), rich=None, interval=float("inf"))
        return
    if not out.isatty():
        reporter = Stages(stream=out, rich=None, interval=interval)
        try:
            yield reporter
        finally:
            reporter.end()
        return
    with rich_progress("{task.description:<28}", stream=out) as progress:
        yield Stages(stream=out, rich=progress, interval=interval)


def rich_progress(
    description: str, *, eta_label: str = "", trailer: str = "", stream: TextIO | None = None
) -> Any:
    """A rich ``Progress`` (not started) with mergeopt's columns: ``description`` (a rich
    format of the task), the bar, done/total, elapsed time, ``eta_label`` and the time
    remaining, then ``trailer`` (a format too); written to ``stream`` (default: stdout)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns: list[ProgressColumn] = [
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    columns += [TextColumn(eta_label)] if eta_label else []
    columns += [TimeRemainingColumn()]
    columns += [TextColumn(trailer)] if trailer else []
    console = Console(file=stream) if stream is not None else None
    return Progress(*columns, console=console, transient=False)
