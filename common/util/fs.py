"""Durable, atomic file writes: nothing half-written is ever visible, and a rename survives a crash.

One behaviour everywhere: :func:`fsync_dir` raises when a directory's fsync fails (the rename
it should make durable may be lost), except on filesystems that cannot fsync a directory at
all (``EINVAL``/``ENOTSUP``, some network filesystems), where there is nothing more to do.
Write failures are raised as the ``OSError`` they are, after the temporary file is removed;
callers word them for their users.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flexfed.common.errors import InvalidInputError, OutputExistsError

# Directory fsync is impossible here, not failed: nothing to report.
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR})


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


_TEMPORARY = re.compile(r"\..+\.tmp-[0-9a-f]{12}")


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of this module's temporary files or folders (left by a crash)."""
    return _TEMPORARY.fullmatch(name) is not None


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temporary sibling, fsync, rename).

    ``mode`` sets the file's permissions before it becomes visible (whatever the umask).
    """
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        # Without a mode, the file gets the usual 0666 less the umask, as open() would give.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 from the first byte on; never replace an existing file.

    Raises ``FileExistsError`` (for the caller to word) when ``path`` exists, and
    :class:`InvalidInputError` when it cannot be written.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise
    except OSError as err:
        raise InvalidInputError(f"cannot write {path}: {err.strerror or err}") from err
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``out`` only if the block succeeds.

    Nothing half-written is ever visible at ``out``: on any error the temporary directory is
    removed and ``out`` is untouched.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; choose another --out or remove it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
    except OSError as err:
        raise InvalidInputError(f"cannot write to {parent}: {err.strerror or err}") from err
    try:
        yield tmp
        if out.exists():  # overwrite=True: move the old one aside only once the new one is whole
            trash = parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
