"""Failpoints: named places where a crash test can stop the coordinator, to kill it there.

For tests only. A failpoint is a call ``failpoint("submit-after-log")`` at a crash window of
the server (between a durable write and the one that must follow it). It does nothing unless
the environment variable ``FLEXFED_FAILPOINTS`` names it when this module is imported
(normally: when ``flexfed coordinator serve`` starts); disarmed, a call costs one dict lookup.
The variable is a comma-separated list of ``name`` or ``name=ACTION``:

- ``pause`` (the default): write the marker file ``$FLEXFED_FAILPOINT_DIR/<name>`` (so the
  test knows the server got there), then block the calling thread forever; the test kills
  the process with SIGKILL;
- ``crash``: write the marker, then SIGKILL this process at once;
- ``enospc``: write the marker, then raise ``OSError(ENOSPC)`` as a full disk would (the
  server goes on);
- ``error``: write the marker, then raise ``RuntimeError`` (a failure of whatever follows).

Example: ``FLEXFED_FAILPOINTS=submit-after-log FLEXFED_FAILPOINT_DIR=/tmp/fp flexfed
coordinator serve DIR``. The failpoints the server has (see :data:`NAMES`):

``upload-write``
    an upload chunk is checked and about to be written (store.append);
``upload-after-chunk``
    an upload chunk is written and fdatasynced, not yet acknowledged (store.append);
``submit-after-log``
    an ``expert-accepted`` entry is in the log, its registry row is not (pipeline);
``release-after-assembly``
    a release is assembled in staging, nothing is logged yet (lifecycle.release);
``registry-after-log``
    a log entry is written, its registry change not yet (Coordinator.after_log);
``release-after-log``
    a release is logged (assembly.json records its entry), not yet signed, stored or in
    the registry (lifecycle.release).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Final

from flexfed.common.util.fs import atomic_write_text

logger = logging.getLogger(__name__)

ENV: Final = "FLEXFED_FAILPOINTS"
DIR_ENV: Final = "FLEXFED_FAILPOINT_DIR"
ACTIONS: Final = ("pause", "crash", "enospc", "error")
NAMES: Final = (
    "upload-write",
    "upload-after-chunk",
    "submit-after-log",
    "release-after-assembly",
    "release-after-log",
    "registry-after-log",
)


def parse(spec: str) -> dict[str, str]:
    """``"a,b=crash"`` -> ``{"a": "pause", "b": "crash"}``; raises ValueError on a bad one."""
    armed: dict[str, str] = {}
    for item in spec.split(","):
        name, _, action = item.strip().partition("=")
        if not name:
            continue
        action = action.strip() or "pause"
        if name not in NAMES or action not in ACTIONS:
            raise ValueError(
                f"{ENV}: {item.strip()!r} is not NAME[=ACTION] with NAME one of {NAMES} and "
                f"ACTION one of {ACTIONS}"
            )
        armed[name] = action
    return armed


_armed: dict[str, str] = parse(os.environ.get(ENV, ""))
if _armed:
    logger.warning("failpoints armed (tests only): %s", _armed)


def arm(spec: str) -> None:
    """Re-read the armed failpoints from ``spec`` (what ``$FLEXFED_FAILPOINTS`` would hold)."""
    global _armed
    _armed = parse(spec)


def failpoint(name: str) -> None:
    """Stop here if the failpoint ``name`` is armed (see the module's doc); else nothing."""
    action = _armed.get(name)
    if action is None:
        return
    _trip(name, action)


def _trip(name: str, action: str) -> None:  # pragma: no cover - runs in a server that dies
    folder = os.environ.get(DIR_ENV)
    if folder:
        marker = Path(folder) / name
        # NOTE: the marker appears whole (a test polls for it)
        atomic_write_text(marker, f"{os.getpid()}\n")
    logger.warning("failpoint %s reached (%s)", name, action)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    if action == "error":
        raise RuntimeError(f"failpoint {name}")
    if action == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    forever = threading.Event()
    while True:
        forever.wait(3600)
