"""Admission of transfer streams: no member, and no set of members, can starve the others.

A gRPC server in Python serves every call on one thread of a fixed pool (``limits.workers``),
and an ``Upload`` or ``Download`` stream holds its thread for as long as it lives, however
slowly its client sends or reads. Before this bound, eight idle streams from one owner (or
eight half-read downloads from one auditor) held every thread of the default pool, and every
other member's calls and the health check waited for the idle watchdog.

:class:`StreamSlots` bounds the streams open at once:

- **per member** (``limits.streams_per_member``): one organisation, whatever its role, holds
  at most this many; the next is refused at once;
- **in all** (``limits.workers - limits.reserved_workers``): the threads left over always serve
  the short calls (registry, audit, health), which never wait on a client.

A refusal is ``RESOURCE_EXHAUSTED`` with a message starting ``busy:``; clients
(:mod:`flexfed.common.api.transfer`) back off and retry it, since it ends when a stream does.
Together with the server's ``maximum_concurrent_rpcs`` (calls beyond it are refused rather
than queued) and the idle watchdog (a stream without progress is cancelled), a member can
delay the others' transfers by at most its share of slots, and never their other calls.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from flexfed.common.api.transfer import BUSY
from flexfed.common.errors import FlexfedError


class StreamLimitError(FlexfedError):
    """No stream slot is free for this caller now (``RESOURCE_EXHAUSTED``, retryable)."""


class StreamSlots:
    """Counts open transfer streams, per member and in all (thread-safe)."""

    def __init__(self, total: int, per_member: int) -> None:
        if total < 1 or per_member < 1:
            raise ValueError("stream limits must be positive")
        self.total = total
        self.per_member = per_member
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def in_use(self, member: str | None = None) -> int:
        """Streams open now: a member's, or everybody's."""
        with self._lock:
            return self._open[member] if member is not None else sum(self._open.values())

    @contextmanager
    def hold(self, member: str, what: str) -> Iterator[None]:
        """Hold a slot for ``member`` while the block runs; raise :class:`StreamLimitError`
        at once when none is free."""
        with self._lock:
            if self._open[member] >= self.per_member:
                raise StreamLimitError(
                    f"{BUSY} {member} already has {self._open[member]} transfer stream(s) open, "
                    f"the most one member may (limits.streams_per_member = {self.per_member}); "
                    f"finish one before opening another ({what})"
                )
            if sum(self._open.values()) >= self.total:
                raise StreamLimitError(
                    f"{BUSY} the coordinator is serving its most transfer streams at once "
                    f"({self.total}); retry shortly ({what})"
                )
            self._open[member] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[member] -= 1
                if self._open[member] <= 0:
                    del self._open[member]
