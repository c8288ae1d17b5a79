"""An idle watchdog: act once when nothing happened for a while (stalled transfers).

Both ends of a transfer use it: the client cancels a stream that stopped making progress and
resumes it; the coordinator cancels a stream whose client stopped sending or reading, so a
stalled client cannot hold a worker thread until its own deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class IdleWatchdog:
    """Calls ``on_idle`` once when :meth:`kick` was not called for ``limit`` seconds.

    A context manager: the watching thread runs inside the ``with`` block only. ``stalled``
    says afterwards whether it fired.
    """

    def __init__(
        self, limit: float, on_idle: Callable[[], Any] = lambda: None, name: str = "idle-watch"
    ) -> None:
        self.limit = limit
        self.on_idle = on_idle
        self.stalled = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name=name)

    def kick(self) -> None:
        """Progress: the idle time starts again."""
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.limit / 4)):
            if time.monotonic() - self._last > self.limit:
                self.stalled = True
                self.on_idle()
                return

    def __enter__(self) -> IdleWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
