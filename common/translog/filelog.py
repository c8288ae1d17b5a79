"""The durable log: records appended to one file and fsynced, a torn final record cut on open.

Only the 32-byte leaf hashes are held in memory; a proof costs O(n) hashing (no interior nodes
are cached yet) and O(log n) memory. The log is generic: ``types`` (if given) is the event
vocabulary its entries must use (:mod:`flexfed.common.translog.entries`).
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
from array import array
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import (
    ConfigError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.translog.checkpoint import Checkpoint, SignedCheckpoint, sign_checkpoint
from flexfed.common.translog.entries import (
    MAX_ENTRY_BYTES,
    EntryError,
    canonical_entry,
    parse_canonical,
)
from flexfed.common.translog.merkle import HASH_SIZE, MerkleTree, check_index, leaf_hash
from flexfed.common.util.fs import fsync_dir

try:  # NOTE: POSIX advisory locking; without it (Windows) a second writer is not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOG_MAGIC: Final = b"flexfed-tlog v1\n"
_LENGTH = struct.Struct(">I")
_MAX_RECORD: Final = _LENGTH.size + MAX_ENTRY_BYTES + HASH_SIZE


class LogIntegrityError(VerificationError):
    """A log file holds a record that fails its checksum before its final record."""


class LogFormatError(InvalidInputError):
    """A file is not a flexfed transparency log."""


class LogLockedError(ConfigError):
    """Another process has the log file open for writing."""


# --- the file-backed log -------------------------------------------------------------------


class FileLog:
    """An append-only transparency log in one file, for a single writer.

    File layout: :data:`LOG_MAGIC`, then one record per entry:
    ``u32 big-endian length || entry || leaf_hash(entry)``. The stored leaf hash doubles as
    the record's checksum. Every append is fsynced before its index is returned.

    On open, every record is re-hashed and checked. A bad or incomplete *final* record (or a
    zero-filled tail) is what a crash mid-append leaves: it is truncated away with a warning,
    ``truncated_bytes`` says how much, and its bytes are kept in ``<log>.torn-<offset>``.
    Anything else that fails its checksum is never repaired: :class:`LogIntegrityError`.
    Memory: the leaf hashes (32 bytes) and record offsets (8 bytes) per entry; entries stay
    on disk.
    """

    def __init__(self, path: Path | str, types: Collection[str] | None = None) -> None:
        self.path = Path(path)
        self.types = None if types is None else frozenset(types)
        self._tree = MerkleTree()
        self._offsets = array("Q")  # (n,) byte offset of each record
        self.truncated_bytes = 0
        if not self.path.parent.is_dir():
            raise MissingFileError(f"directory for the log not found: {self.path.parent}")
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as err:
                    raise LogLockedError(
                        f"{self.path} is open for writing by another process; a log has one writer"
                    ) from err
            self._end = self._load()
            if created:
                fsync_dir(self.path.parent)
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> FileLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (and release the writer lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def size(self) -> int:
        """Number of entries."""
        return self._tree.size

    def append(self, event: Mapping[str, Any]) -> int:
        """Log an event durably; return its index once it is on disk."""
        data = canonical_entry(event, self.types)
        h = leaf_hash(data)
        record = _LENGTH.pack(len(data)) + data + h
        self._write_at(self._end, record)
        index = self._tree.append_leaf_hash(h)
        self._offsets.append(self._end)
        self._end += len(record)
        return index

    def root(self, tree_size: int | None = None) -> bytes:
        """MTH of the first ``tree_size`` entries (default: all)."""
        return self._tree.root(tree_size)

    def entry(self, index: int) -> bytes:
        """The raw bytes of entry ``index`` (what the leaf hash is over)."""
        check_index(index, self.size, "entry index", "log size")
        offset = self._offsets[index]
        (length,) = _LENGTH.unpack(os.pread(self._fd, _LENGTH.size, offset))
        return os.pread(self._fd, length, offset + _LENGTH.size)

    def entries(self, start: int, end: int) -> list[bytes]:
        """The raw entries ``start`` up to (not including) ``end``."""
        if not 0 <= start <= end <= self.size:
            raise InvalidInputError(f"entry range [{start}, {end}) is not within 0..{self.size}")
        return [self.entry(i) for i in range(start, end)]

    def leaf_hash_at(self, index: int) -> bytes:
        """The leaf hash of entry ``index``."""
        return self._tree.leaf_hash_at(index)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """Inclusion proof of entry ``index`` in the tree of ``tree_size`` (O(n) hashing)."""
        return self._tree.inclusion_proof(index, tree_size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Consistency proof between two sizes of this log (O(n) hashing)."""
        return self._tree.consistency_proof(old_size, new_size)

    def checkpoint(self, origin: str, private_key: ec.EllipticCurvePrivateKey) -> SignedCheckpoint:
        """Sign a checkpoint of the log as it is now."""
        return sign_checkpoint(Checkpoint(origin, self.size, self.root()), private_key)

    def _write_at(self, offset: int, data: bytes) -> None:
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], offset + written)
            os.fsync(self._fd)
        except OSError:
            # NOTE: leave no partial record behind for the next append to write after.
            try:
                os.ftruncate(self._fd, offset)
            except OSError:
                logger.exception("could not cut a failed write from %s", self.path)
            raise

    def _load(self) -> int:
        """Read and check every record; cut a torn tail; return the end of the last record."""
        file_size = os.fstat(self._fd).st_size
        with open(self._fd, "rb", closefd=False, buffering=1 << 20) as f:
            head = f.read(len(LOG_MAGIC))
            if head != LOG_MAGIC:
                if not LOG_MAGIC.startswith(head):
                    raise LogFormatError(f"{self.path} is not a flexfed transparency log")
                # Empty, or created by a crash before its header was complete.
                if head:
                    self._cut(0, file_size, "an incomplete header", b"")
                self._write_at(0, LOG_MAGIC)
                return len(LOG_MAGIC)
            offset = len(LOG_MAGIC)
            while offset < file_size:
                problem = self._read_record(f, offset, file_size)
                if problem is None:
                    offset = f.tell()
                    continue
                why, length = problem
                tail = b""
                if file_size - offset <= _MAX_RECORD:
                    f.seek(offset)
                    tail = f.read()
                if tail and _is_torn(tail, length):
                    self._cut(offset, file_size, why, tail)
                    break
                raise LogIntegrityError(
                    f"{self.path}: record {self.size} at byte {offset} is corrupt ({why}) and "
                    "is not a torn last append; restore the log from a replica"
                )
        return offset

    def _read_record(
        self, f: BinaryIO, offset: int, file_size: int
    ) -> tuple[str, int | None] | None:
        """Add the record at ``offset`` to the tree, or say what is wrong and its length."""
        header = f.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return "an incomplete length prefix", None
        (length,) = _LENGTH.unpack(header)
        if not 0 < length <= MAX_ENTRY_BYTES:
            return f"an impossible length {length}", length
        if offset + _LENGTH.size + length + HASH_SIZE > file_size:
            return "an incomplete record", length
        data = f.read(length)
        h = leaf_hash(data)
        if f.read(HASH_SIZE) != h:
            return "a checksum mismatch", length
        try:
            parse_canonical(data, self.types)
        except EntryError as err:
            # The checksum matched: this was written on purpose, not torn by a crash.
            raise LogIntegrityError(f"{self.path}: entry {self.size} is invalid: {err}") from err
        self._tree.append_leaf_hash(h)
        self._offsets.append(offset)
        return None

    def _cut(self, offset: int, file_size: int, why: str, tail: bytes) -> None:
        """Truncate a torn tail, keeping its bytes beside the log as evidence."""
        kept = f", kept in {self._keep(offset, tail)}" if tail.strip(b"\x00") else ""
        logger.warning(
            "%s: truncated %d bytes of a torn final record (%s) left by an interrupted append%s",
            self.path,
            file_size - offset,
            why,
            kept,
        )
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self.truncated_bytes = file_size - offset

    def _keep(self, offset: int, tail: bytes) -> Path:
        for n in itertools.count():
            path = self.path.with_name(f"{self.path.name}.torn-{offset}" + (f".{n}" if n else ""))
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            try:
                os.write(fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            return path
        raise AssertionError("unreachable")  # pragma: no cover


def _is_torn(tail: bytes, length: int | None) -> bool:
    """Whether the bytes from a bad record to the end of file can be one interrupted append.

    An append writes one record of at most :data:`_MAX_RECORD` bytes and is fsynced before the
    next starts, so a crash leaves a prefix of that one record, possibly with blocks the
    file system had not yet filled (zeros). A bad record with more after it is corruption.
    """
    if length is None or not tail.strip(b"\x00"):
        return True  # the length prefix itself was cut, or nothing of the record landed
    return 0 < length <= MAX_ENTRY_BYTES and len(tail) <= _LENGTH.size + length + HASH_SIZE
