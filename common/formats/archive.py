"""Artifacts on the wire: one deterministic, uncompressed tar stream per directory.

An artifact (an anchor, an expert bundle, an assembled model) is a directory. It travels, and
is stored by the coordinator, as one tar stream whose SHA-256 is its identity
(``"sha256:<64 lowercase hex>"``). For that identity to be stable the stream must depend only
on the directory's names and bytes, so :func:`pack_directory` writes:

- POSIX pax format (plain USTAR headers; a pax header only for names USTAR cannot hold), UTF-8;
- entries sorted by relative POSIX path, directories as their own entries, the root omitted;
- regular files and directories only (symbolic links and special files are refused);
- mtime 0, uid/gid 0, no user or group names, mode 0644 for files and 0755 for directories.

Packing the same directory twice, or after touching its files' times or modes, gives the same
bytes. Packing streams to disk while hashing; nothing holds the whole artifact in memory.

:func:`extract_archive` is the strict inverse, for archives from anyone: it refuses links,
devices, absolute or ``..`` paths, duplicate names, content over a size limit and truncated
archives (:class:`UnsafeArchiveError`), and it is atomic: the result appears at ``dst`` (by a
rename) only when every file is written and fsynced.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flexfed.common.errors import InvalidInputError
from flexfed.common.util.digest import sha256_stream
from flexfed.common.util.fs import fsync_dir

DIGEST_PREFIX = "sha256:"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_CHUNK = 1 << 20
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE  # two zero blocks close a tar archive


class ArtifactKind(enum.IntEnum):
    """What an artifact is. The numbers are those of the proto's ``ArtifactKind``."""

    ANCHOR = 1
    EXPERT_BUNDLE = 2
    MODEL = 3

    @property
    def label(self) -> str:
        """Lower-case name for files and messages (``expert_bundle``)."""
        return self.name.lower()


@dataclass(frozen=True)
class ArtifactInfo:
    """An artifact's identity: the digest and length of its tar stream, and its kind."""

    digest: str  # "sha256:<64 hex>"
    kind: ArtifactKind
    size: int  # bytes of the tar stream


@dataclass(frozen=True)
class PackedArchive:
    """A tar stream written by :func:`pack_directory`."""

    path: Path
    digest: str  # "sha256:<64 hex>"
    size: int


class MalformedDigestError(InvalidInputError):
    """A digest string is not ``sha256:<64 lowercase hex>``."""


class UnsafeArchiveError(InvalidInputError):
    """An archive holds something extraction refuses: a link, a device, an escaping or
    duplicate path, too many bytes, or it is truncated or malformed."""


class DestinationExistsError(InvalidInputError, FileExistsError):
    """The output path already exists; flexfed never overwrites an artifact in place."""


def parse_digest(digest: str) -> str:
    """The 64 hex characters of a ``sha256:<hex>`` digest; raises :class:`MalformedDigestError`."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise MalformedDigestError(
            f"digest {digest!r} is malformed: expected 'sha256:' and 64 lowercase hex characters"
        )
    return digest[len(DIGEST_PREFIX) :]


def format_digest(hexdigest: str) -> str:
    """``sha256:<hex>`` from a hex SHA-256."""
    return DIGEST_PREFIX + hexdigest


def stream_digest(f: BinaryIO) -> tuple[str, int]:
    """The ``sha256:<hex>`` digest and length of everything left in ``f``."""
    hexdigest, n = sha256_stream(f)
    return format_digest(hexdigest), n


# --- packing -------------------------------------------------------------------------------


class _HashingWriter:
    """A write-only file object that hashes and counts what passes through it."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self._f.write(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def _entries(src: Path) -> list[tuple[str, Path, bool]]:
    """(relative POSIX path, path, is_dir) of everything below ``src``, sorted by path."""
    found: list[tuple[str, Path, bool]] = []
    stack = [src]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as it:
            for entry in it:
                path = Path(entry.path)
                rel = path.relative_to(src).as_posix()
                if entry.is_symlink():
                    raise InvalidInputError(
                        f"{path} is a symbolic link; artifacts hold regular files only"
                    )
                if entry.is_dir(follow_symlinks=False):
                    found.append((rel, path, True))
                    stack.append(path)
                elif entry.is_file(follow_symlinks=False):
                    found.append((rel, path, False))
                else:
                    raise InvalidInputError(
                        f"{path} is not a regular file or directory; artifacts hold neither "
                        "devices, sockets nor pipes"
                    )
    return sorted(found)


def _tarinfo(name: str, is_dir: bool, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
    info.mode = _DIR_MODE if is_dir else _FILE_MODE
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def pack_directory(src: Path, dst: Path) -> PackedArchive:
    """Write directory ``src`` as a deterministic tar stream to ``dst``; return its digest.

    The stream is written to a temporary sibling of ``dst``, fsynced and renamed, so ``dst``
    never holds a partial archive. Raises :class:`InvalidInputError` for a symbolic link or a
    special file in ``src`` and :class:`DestinationExistsError` if ``dst`` exists.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise InvalidInputError(f"{src} is not a directory")
    if dst.exists():
        raise DestinationExistsError(f"{dst} already exists; choose a new output path")
    entries = _entries(src)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "xb") as raw:
            out = _HashingWriter(raw)
            # NOTE: mode "w" (not the "w|" stream mode) writes straight to our writer; a 1 MiB
            # copy buffer keeps hashing and writing cheap for multi-GB weight files.
            with tarfile.TarFile(
                fileobj=out,  # type: ignore[arg-type]
                mode="w",
                format=tarfile.PAX_FORMAT,
                encoding="utf-8",
                copybufsize=_CHUNK,
            ) as tar:
                for rel, path, is_dir in entries:
                    if is_dir:
                        tar.addfile(_tarinfo(rel, True))
                        continue
                    with open(path, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        try:
                            tar.addfile(_tarinfo(rel, False, size), f)
                        except tarfile.ReadError as err:  # the file shrank while packing
                            raise InvalidInputError(
                                f"{path} changed while it was being packed"
                            ) from err
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PackedArchive(dst, format_digest(out.sha256.hexdigest()), out.size)


# --- extraction ----------------------------------------------------------------------------


_MAX_PART_BYTES = 255  # NAME_MAX of common filesystems
_MAX_NAME_BYTES = 1024  # far above any artifact's own names, below PATH_MAX with any root


def _safe_parts(name: str) -> tuple[str, ...]:
    """The path components of a member name, or raise if it could escape or is odd."""
    if name.startswith("/"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if len(name.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES:
        # FIX (issue 12): a 300-character name failed the extraction with the OS's "File name
        # too long" and the extraction directory's path, as an internal error.
        raise UnsafeArchiveError(
            f"archive member {name[:40]!r}... has a name of more than {_MAX_NAME_BYTES} bytes"
        )
    parts = tuple(name.rstrip("/").split("/"))
    for part in parts:
        if len(part.encode("utf-8", "surrogateescape")) > _MAX_PART_BYTES:
            raise UnsafeArchiveError(
                f"archive member {name[:40]!r}... has a path component of more than "
                f"{_MAX_PART_BYTES} bytes"
            )
        if part in ("", ".", ".."):
            raise UnsafeArchiveError(
                f"archive member {name!r} has an empty, '.' or '..' path component"
            )
        if "\\" in part or "\0" in part:
            raise UnsafeArchiveError(f"archive member {name!r} has a backslash or NUL")
    return parts


def _check_end(archive: Path, offset: int) -> None:
    """Refuse an archive whose entries do not end with the end-of-archive marker.

    NOTE: tarfile stops silently at a truncated or corrupt header after the first one, so a
    cut-off archive would otherwise extract as a smaller, valid-looking artifact.
    """
    size = archive.stat().st_size
    if size < offset + _END_OF_ARCHIVE:
        raise UnsafeArchiveError(f"{archive} is truncated (no end-of-archive marker)")
    with open(archive, "rb") as f:
        f.seek(offset)
        while chunk := f.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                raise UnsafeArchiveError(
                    f"{archive} is truncated or corrupt at byte {offset} (a header is damaged, "
                    "or data follows the end-of-archive marker)"
                )


def _extract_into(tar: tarfile.TarFile, tmp: Path, max_bytes: int | None) -> int:
    """Write every member below ``tmp``; return the offset where the members end."""
    seen: dict[tuple[str, ...], bool] = {}  # parts -> is_dir
    total = 0
    for member in tar:
        parts = _safe_parts(member.name)
        if not (member.isreg() or member.isdir()) or member.issparse():
            raise UnsafeArchiveError(
                f"archive member {member.name!r} is a link or special file; "
                "artifacts hold regular files and directories only"
            )
        if parts in seen:
            raise UnsafeArchiveError(f"archive member {member.name!r} appears twice")
        for i in range(1, len(parts)):
            if seen.get(parts[:i]) is False:
                raise UnsafeArchiveError(
                    f"archive member {member.name!r} lies below a file of the same name"
                )
        seen[parts] = member.isdir()
        target = tmp.joinpath(*parts)
        if member.isdir():
            target.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
            continue
        total += member.size
        if max_bytes is not None and total > max_bytes:
            raise UnsafeArchiveError(
                f"archive content exceeds the limit of {max_bytes} bytes "
                f"(at member {member.name!r})"
            )
        target.parent.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        source = tar.extractfile(member)
        assert source is not None  # a regular file always has a file object
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        with os.fdopen(os.open(target, flags, _FILE_MODE), "wb") as out:
            remaining = member.size
            while remaining:
                chunk = source.read(min(_CHUNK, remaining))
                if not chunk:
                    raise UnsafeArchiveError(f"archive is truncated inside {member.name!r}")
                out.write(chunk)
                remaining -= len(chunk)
            out.flush()
            os.fsync(out.fileno())
    return tar.offset


def extract_archive(archive: Path, dst: Path, *, max_bytes: int | None = None) -> Path:
    """Extract a tar stream into the new directory ``dst``, safely and atomically.

    ``max_bytes`` bounds the total size of the extracted files. Raises
    :class:`UnsafeArchiveError` for anything but plain files and directories with relative,
    non-escaping, unique names, for content over ``max_bytes`` and for a truncated archive,
    and :class:`DestinationExistsError` if ``dst`` exists. On any error nothing is left behind.
    """
    archive, dst = Path(archive), Path(dst)
    if dst.exists() or dst.is_symlink():
        raise DestinationExistsError(f"{dst} already exists; choose a new output directory")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir(mode=_DIR_MODE)
    try:
        try:
            with tarfile.open(archive, mode="r:", encoding="utf-8") as tar:
                end = _extract_into(tar, tmp, max_bytes)
            _check_end(archive, end)
        except tarfile.TarError as err:
            raise UnsafeArchiveError(f"{archive} is not a valid tar archive: {err}") from err
        for folder, _, _ in os.walk(tmp, topdown=False):
            fsync_dir(Path(folder))
        if dst.exists() or dst.is_symlink():  # NOTE: rename would replace an empty directory
            raise DestinationExistsError(f"{dst} appeared while extracting; not replacing it")
        os.rename(tmp, dst)
        fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
