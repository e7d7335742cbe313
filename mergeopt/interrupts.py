"""Ctrl-C, SIGTERM and SIGHUP in a worker process: interrupt once, at a safe point."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupts:
    """Ctrl-C in a worker: the first SIGINT interrupts (at once, or at the end of a deferred
    section such as ``study.ask``); later ones — the parent forwards the terminal's signal —
    are ignored, so the handler that fails and requeues the trial always runs to its end."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = "SIGINT"
        self._deferred = 0

    @classmethod
    def install(cls) -> Interrupts:
        """Handle Ctrl-C, and SIGTERM/SIGHUP (SLURM's end of a job, a closed terminal) alike."""
        interrupts = cls()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, interrupts._handle)
        return interrupts

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            return
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if not self._deferred:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
        if self.requested and not self._deferred:
            raise KeyboardInterrupt
