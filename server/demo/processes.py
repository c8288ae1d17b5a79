"""A group of local service processes: start them, watch them, stop them, keep their logs.

Each service (a coordinator, a Flower SuperLink, a SuperNode, a ``flwr run``) is started in a
session of its own with its output in ``<logs>/<name>.log``. :class:`Services` waits for a
service to say it is ready, checks that services are still alive, and stops them all: each
process group is terminated (the helpers a service started go with it), helpers that left
for sessions of their own are found by parentage, and whatever does not stop is killed.
Short commands run to completion with :func:`run_cli`, their output logged the same way.
:func:`sigterm_as_exit` makes SIGTERM unwind like Ctrl-C, so the ``finally`` that stops the
services runs on either.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from flexfed.common.errors import FlexfedError

START_TIMEOUT = 120.0  # seconds for a service to come up (imports are slow on a busy machine)
TAIL_LINES = 25


class ServiceError(FlexfedError):
    """A service or command failed or did not come up (the message holds its log's tail)."""


def free_port() -> int:
    """A port nobody listens on now (the SuperLink and SuperNodes need one up front)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a log, or why there are none."""
    if not path.is_file():
        return f"({path} was not written)"
    text = path.read_text(errors="replace").rstrip().splitlines()
    return "\n".join(text[-lines:]) or f"({path} is empty)"


@dataclass
class Services:
    """The long-running processes, each leading its own process group, and their logs.

    ``stop_all`` terminates each group (a SuperLink's ServerApp and a SuperNode's ClientApp
    processes with it), then kills what did not stop.
    """

    logs: Path
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def start(
        self, name: str, args: list[str | Path], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log(name).open("wb") as out:  # the child keeps its own descriptor
            proc = subprocess.Popen(
                [str(a) for a in args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,  # NOTE: Ctrl-C reaches only us; we stop the group
            )
        self.running[name] = proc
        return proc

    def wait_for(self, name: str, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Wait until ``name``'s log matches ``pattern``; fail if it exits or times out."""
        proc, log = self.running[name], self.log(name)
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, log.read_text(errors="replace"))
            if match:
                return match
            if proc.poll() is not None:
                raise ServiceError(
                    f"{name} exited ({proc.returncode}) before it was ready; {log}:\n{tail(log)}"
                )
            if time.monotonic() > deadline:
                raise ServiceError(f"{name} not ready after {timeout:.0f}s; {log}:\n{tail(log)}")
            time.sleep(0.2)

    def check_alive(self, names: list[str]) -> None:
        for name in names:
            proc = self.running[name]
            if proc.poll() is not None:
                raise ServiceError(
                    f"{name} exited ({proc.returncode}); {self.log(name)}:\n{tail(self.log(name))}"
                )

    def stop(self, name: str, grace: float = 10.0) -> None:
        proc = self.running.pop(name)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=30)
        # a ClientApp or ServerApp child may outlive its leader: end the group regardless
        _signal_group(proc, signal.SIGKILL)

    def stop_all(self, grace: float = 10.0) -> None:
        # NOTE: Flower starts some helpers in sessions of their own (the SuperLink's SuperExec,
        # which starts the ServerApp): they are found by parentage, before their parents go.
        detached = {
            pid
            for proc in self.running.values()
            for pid in _descendants(proc.pid)
            if _pgid(pid) not in (None, proc.pid)
        }
        for proc in reversed(self.running.values()):
            if proc.poll() is None:
                _signal_group(proc, signal.SIGTERM)
        for pid in detached:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        for name in reversed(list(self.running)):
            self.stop(name, grace)
        deadline = time.monotonic() + grace
        while detached and time.monotonic() < deadline:
            detached = {pid for pid in detached if _alive(pid)}
            time.sleep(0.1)
        for pid in detached:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def run_cli(
    name: str, args: list[str | Path], env: dict[str, str], logs: Path, cwd: Path | None = None
) -> str:
    """One short command (``flexfed ...`` or ``flwr ...``); its output, also in ``logs``."""
    done = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    logs.mkdir(parents=True, exist_ok=True)
    out = done.stdout + done.stderr
    (logs / f"{name}.log").write_text(out)
    if done.returncode != 0:
        short = "\n".join(out.rstrip().splitlines()[-TAIL_LINES:])
        raise ServiceError(f"{name} failed (exit {done.returncode}):\n{short}")
    return done.stdout


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (so the services are stopped); restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


# --- process groups and parentage ----------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (empty where there is none: not Linux)."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_ = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        tree.setdefault(int(fields_[1]), []).append(int(stat.parent.name))
    return tree


def _descendants(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: its parent, ours, is gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return _pgid(pid) is not None
    return state != "Z"


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
