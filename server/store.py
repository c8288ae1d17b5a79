"""The coordinator's content-addressed artifact store, with resumable, verified uploads.

Layout under ``root``::

    blobs/sha256/<hex>         an artifact's tar stream (read-only), named by its SHA-256
    blobs/sha256/<hex>.json    {"digest", "kind", "size", "created"[, "uploaded_by"]}
    uploads/<upload_id>.json   {"upload_id", "kind", "size", "digest", "owner", "created"}
    uploads/<upload_id>.part   the bytes received so far

Invariants the coordinator relies on:

- **Nothing half-written is ever visible.** A blob appears only by an atomic rename, after its
  whole SHA-256 was recomputed from disk and matched, and after its metadata file is in
  place; temporary files carry a ``.tmp-`` name and :meth:`ArtifactStore.recover` deletes them.
- **What was counted is durable.** An upload's offset *is* the length of its ``.part`` file;
  a chunk is checked against its SHA-256 before it is written and fsynced before it counts,
  so after a crash or a broken stream the client resumes from :meth:`upload_state`.
- **Bad input loses nothing.** A wrong offset, a corrupt chunk, an oversize chunk or upload is
  refused before anything is written; only a whole-digest mismatch at :meth:`finish`
  discards the upload (its bytes can never become the promised artifact).
- **Memory is independent of artifact size**: at most one chunk (``max_chunk_bytes``) per call.

Uploads belong to the organisation that started them; ``owner=None`` in a call means the
operator, who may see and continue any upload. Thread-safe: one lock per upload serialises
appends, and one store lock covers the index and the final rename.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from flexfed.common.errors import (
    DigestMismatchError,
    InvalidInputError,
    TransferError,
)
from flexfed.common.formats.archive import (
    ArtifactInfo,
    ArtifactKind,
    format_digest,
    pack_directory,
    parse_digest,
    stream_digest,
)
from flexfed.common.util.clock import utc_now, utc_now_iso
from flexfed.common.util.fs import atomic_write_bytes, fsync_dir, is_temporary
from flexfed.server.failpoints import failpoint

log = logging.getLogger(__name__)

_UPLOAD_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_HEX_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP = ".tmp-"
_COPY_CHUNK = 1 << 20
ABANDONED_UPLOAD_TTL = dt.timedelta(days=7)  # no chunk for this long: the upload is dropped
FINISHED_UPLOAD_TTL = dt.timedelta(days=1)


# --- errors (the servicer maps each to a gRPC status) ---------------------------------------


class ArtifactTooLargeError(InvalidInputError):
    """An upload or a chunk is larger than the server accepts."""


class UploadQuotaError(InvalidInputError):
    """The owner holds as many unfinished uploads as it may (``RESOURCE_EXHAUSTED``)."""


class UnknownUploadError(InvalidInputError, LookupError):
    """No upload has this id."""


class UnknownArtifactError(InvalidInputError, LookupError):
    """No artifact with this digest is in the store."""


class UploadPermissionError(InvalidInputError, PermissionError):
    """The upload belongs to another organisation."""


class ChunkDigestError(DigestMismatchError):
    """A chunk's bytes do not hash to the SHA-256 sent with it; nothing was written."""


class OffsetMismatchError(TransferError):
    """A chunk was sent for another offset than the one the server holds."""

    def __init__(self, message: str, expected: int) -> None:
        super().__init__(message)
        self.expected = expected


class UploadIncompleteError(TransferError):
    """The upload was asked to finish before all of its bytes arrived."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


class UploadCompleteError(TransferError):
    """The upload's artifact is already in the store; there is nothing left to append."""


@dataclass(frozen=True)
class UploadState:
    """Where an upload stands: ``offset`` bytes are durable; ``complete`` when stored."""

    upload_id: str  # "" when the artifact was already stored and no upload was needed
    kind: ArtifactKind
    size: int
    digest: str
    owner: str
    offset: int
    max_chunk_bytes: int
    complete: bool


@dataclass(frozen=True)
class _Upload:
    upload_id: str
    kind: ArtifactKind
    size: int
    digest: str
    owner: str
    created: str


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, sort_keys=True).encode("utf-8"))


class ArtifactStore:
    """Artifacts by digest on a local filesystem, and the uploads that fill it."""

    def __init__(
        self, root: Path, *, max_artifact_bytes: int, max_chunk_bytes: int = 1 << 20
    ) -> None:
        if max_artifact_bytes <= 0 or max_chunk_bytes <= 0:
            raise InvalidInputError("max_artifact_bytes and max_chunk_bytes must be positive")
        self.root = Path(root)
        self.max_artifact_bytes = max_artifact_bytes
        self.max_chunk_bytes = max_chunk_bytes
        self.blobs = self.root / "blobs" / "sha256"
        self.uploads = self.root / "uploads"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # the index, upload locks and the commit rename
        self._upload_locks: dict[str, threading.Lock] = {}
        self._records: dict[str, _Upload] = {}
        for meta in self.uploads.glob("*.json"):
            if _UPLOAD_ID_RE.match(meta.stem):
                self._records[meta.stem] = self._read_record(meta)

    # --- reading the store -----------------------------------------------------------------

    def path(self, digest: str) -> Path:
        """The blob of a stored artifact; raises :class:`UnknownArtifactError` if absent."""
        hexd = parse_digest(digest)
        blob = self.blobs / hexd
        if not (blob.is_file() and (self.blobs / f"{hexd}.json").is_file()):
            raise UnknownArtifactError(f"artifact {digest} is not in the store")
        return blob

    def __contains__(self, digest: object) -> bool:
        try:
            self.path(str(digest))
        except InvalidInputError:
            return False
        return True

    def info(self, digest: str) -> ArtifactInfo:
        """Digest, kind and size of a stored artifact."""
        self.path(digest)
        meta = json.loads((self.blobs / f"{parse_digest(digest)}.json").read_text("utf-8"))
        return ArtifactInfo(digest=digest, kind=ArtifactKind[meta["kind"]], size=meta["size"])

    def uploader(self, digest: str) -> str | None:
        """The organisation whose upload stored the artifact (None: the coordinator's own)."""
        self.path(digest)
        meta = json.loads((self.blobs / f"{parse_digest(digest)}.json").read_text("utf-8"))
        who = meta.get("uploaded_by")
        return who if isinstance(who, str) else None

    def stored(self) -> list[tuple[ArtifactInfo, str]]:
        """Every stored artifact with its creation time (ISO 8601), in digest order."""
        out = []
        for meta in sorted(self.blobs.glob("*.json")):
            if not (self.blobs / meta.stem).is_file():
                continue
            doc = json.loads(meta.read_text("utf-8"))
            info = ArtifactInfo(doc["digest"], ArtifactKind[doc["kind"]], doc["size"])
            out.append((info, str(doc.get("created", ""))))
        return out

    def remove(self, digest: str) -> None:
        """Delete a stored artifact: its blob first, so that it is never half there (an
        artifact is visible only with both files; recover() drops a lone metadata file)."""
        hexd = parse_digest(digest)
        with self._lock:
            (self.blobs / hexd).unlink(missing_ok=True)
            (self.blobs / f"{hexd}.json").unlink(missing_ok=True)
            fsync_dir(self.blobs)
        log.info("removed %s from the store", digest)

    def open(self, digest: str) -> BinaryIO:
        """A binary file object reading a stored artifact (the caller closes it)."""
        return open(self.path(digest), "rb")

    # --- uploads ---------------------------------------------------------------------------

    def start_upload(
        self,
        kind: ArtifactKind,
        size: int,
        digest: str,
        owner: str,
        max_unfinished: int | None = None,
    ) -> UploadState:
        """Begin an upload, resume the owner's unfinished one for ``digest``, or report that
        the artifact is already stored (``complete``).

        ``max_unfinished``: how many unfinished uploads ``owner`` may hold; a new one beyond
        it raises :class:`UploadQuotaError` (resuming one is always allowed)."""
        try:
            kind = ArtifactKind(kind)
        except ValueError as err:
            raise InvalidInputError(f"artifact kind {kind!r} is not valid") from err
        parse_digest(digest)
        if size <= 0:
            raise InvalidInputError(f"upload size must be positive, got {size}")
        if size > self.max_artifact_bytes:
            raise ArtifactTooLargeError(
                f"upload of {size} bytes exceeds the server's limit of "
                f"{self.max_artifact_bytes} bytes"
            )
        if digest in self:
            stored = self.info(digest)
            self._check_same(stored, kind, size)
            return UploadState(
                "", stored.kind, stored.size, digest, owner, stored.size, self.max_chunk_bytes, True
            )
        with self._lock:
            for record in self._records.values():
                if record.digest == digest and record.owner == owner:
                    self._check_same(ArtifactInfo(digest, record.kind, record.size), kind, size)
                    return self._state(record)
            if max_unfinished is not None:
                held = sum(
                    1
                    for r in self._records.values()
                    if r.owner == owner and not (self.blobs / parse_digest(r.digest)).exists()
                )
                if held >= max_unfinished:
                    # FIX (issue 12): uploads were unbounded per member (and kept 7 days).
                    raise UploadQuotaError(
                        f"{owner} already holds {held} unfinished upload(s), the most one member "
                        f"may (limits.uploads_per_member); finish or cancel one first"
                    )
            record = _Upload(secrets.token_hex(16), kind, size, digest, owner, utc_now_iso())
            _write_json_atomic(
                self._meta_path(record.upload_id), asdict(record) | {"kind": kind.name}
            )
            part = self._part_path(record.upload_id)
            part.touch(exist_ok=True)
            fsync_dir(self.uploads)
            self._records[record.upload_id] = record
        log.info(
            "upload %s started: %s %s (%d bytes) by %s",
            record.upload_id,
            kind.label,
            digest,
            size,
            owner,
        )
        return self._state(record)

    def cancel(self, upload_id: str, owner: str | None) -> None:
        """Drop an unfinished upload and its bytes (``owner`` must be its owner; ``None``: the
        operator). A finished one is left alone: its artifact is stored."""
        self._record(upload_id, owner)
        with self._upload_lock(upload_id):
            record = self._record(upload_id, owner)  # NOTE: not discarded while we waited
            if record.digest not in self:
                self._discard(upload_id)
        log.info("upload %s cancelled", upload_id)

    def upload_state(self, upload_id: str, owner: str | None) -> UploadState:
        """The state of an upload; ``owner`` must be its owner (``None``: the operator)."""
        return self._state(self._record(upload_id, owner))

    def append(
        self, upload_id: str, owner: str | None, offset: int, data: bytes, chunk_sha256: str
    ) -> int:
        """Write one verified chunk at ``offset`` durably; return the new offset.

        Checked before anything is written: the owner, the chunk size, the offset (it must be
        the durable offset; :class:`OffsetMismatchError` carries the expected one), the
        declared size, and the chunk's SHA-256 (:class:`ChunkDigestError`).
        """
        record = self._record(upload_id, owner)
        if len(data) > self.max_chunk_bytes:
            raise ArtifactTooLargeError(
                f"chunk of {len(data)} bytes exceeds the server's limit of "
                f"{self.max_chunk_bytes} bytes"
            )
        if not _HEX_RE.match(chunk_sha256):
            raise InvalidInputError(f"chunk_sha256 {chunk_sha256!r} is not 64 lowercase hex")
        with self._upload_lock(upload_id):
            self._record(upload_id, owner)  # NOTE: still there (not discarded meanwhile)
            if record.digest in self:
                raise UploadCompleteError(f"artifact {record.digest} is already stored")
            part = self._part_path(upload_id)
            fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                durable = os.fstat(fd).st_size
                if offset != durable:
                    raise OffsetMismatchError(
                        f"chunk offset {offset} is not the upload's offset; resume from "
                        f"offset {durable}",
                        expected=durable,
                    )
                if offset + len(data) > record.size:
                    raise InvalidInputError(
                        f"chunk of {len(data)} bytes at offset {offset} goes past the declared "
                        f"size of {record.size} bytes"
                    )
                if hashlib.sha256(data).hexdigest() != chunk_sha256:
                    raise ChunkDigestError(
                        f"chunk at offset {offset} does not match its SHA-256; nothing was "
                        "written, send it again"
                    )
                view = memoryview(data)
                written = 0
                try:
                    failpoint("upload-write")  # fault tests: the disk is full
                    while written < len(view):
                        written += os.pwrite(fd, view[written:], offset + written)
                except OSError:
                    # NOTE: a chunk counts whole or not at all: cut what part of it got
                    # written (e.g. on a full disk), so the durable offset stays a chunk end.
                    os.ftruncate(fd, offset)
                    raise
                # NOTE: fdatasync persists the data and the file length (what the offset is
                # read from), without the mtime flush of fsync; per chunk it is the cost of
                # "counted means durable" (about 4 ms per MiB on the benchmark's disk).
                os.fdatasync(fd)
                failpoint("upload-after-chunk")  # crash tests: durable, not acknowledged
            finally:
                os.close(fd)
        return offset + len(data)

    def finish(self, upload_id: str, owner: str | None) -> ArtifactInfo:
        """Verify the whole upload and move it into the store; idempotent.

        Raises :class:`UploadIncompleteError` while bytes are missing, and
        :class:`DigestMismatchError` (after deleting the upload) if the bytes do not hash to
        the promised digest.
        """
        self._record(upload_id, owner)
        with self._upload_lock(upload_id):
            record = self._record(upload_id, owner)  # NOTE: not discarded while we waited
            if record.digest in self:
                self._part_path(upload_id).unlink(missing_ok=True)
                return self.info(record.digest)
            part = self._part_path(upload_id)
            offset = part.stat().st_size if part.exists() else 0
            if offset != record.size:
                raise UploadIncompleteError(
                    f"upload {upload_id} holds {offset} of {record.size} bytes; send the rest "
                    f"from offset {offset}",
                    offset=offset,
                )
            with open(part, "rb") as f:
                actual, _ = stream_digest(f)
            if actual != record.digest:
                self._discard(upload_id)
                raise DigestMismatchError(
                    f"upload {upload_id} hashes to {actual}, not the promised {record.digest}; "
                    "it was discarded, upload the artifact again"
                )
            info = self._commit(part, record.digest, record.kind, record.size, record.owner)
        log.info("upload %s finished: %s", upload_id, info.digest)
        return info

    # --- server-side additions -------------------------------------------------------------

    def put_file(self, path: Path, kind: ArtifactKind) -> ArtifactInfo:
        """Copy a tar stream into the store (atomically; the digest is computed here).

        For the coordinator's own artifacts: no size limit applies and no upload is involved.
        """
        tmp = self.blobs / f"{_TMP}{secrets.token_hex(8)}"
        try:
            h = hashlib.sha256()
            size = 0
            with open(path, "rb") as src, open(tmp, "xb") as dst:
                while chunk := src.read(_COPY_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            return self._commit(tmp, format_digest(h.hexdigest()), ArtifactKind(kind), size)
        finally:
            tmp.unlink(missing_ok=True)

    def put_directory(self, src: Path, kind: ArtifactKind) -> ArtifactInfo:
        """Pack a directory (:func:`~flexfed.common.formats.archive.pack_directory`) into the
        store, e.g. the anchor or an assembled model."""
        tmp = self.blobs / f"{_TMP}{secrets.token_hex(8)}"
        try:
            packed = pack_directory(src, tmp)
            return self._commit(tmp, packed.digest, ArtifactKind(kind), packed.size)
        finally:
            tmp.unlink(missing_ok=True)

    def recover(
        self,
        *,
        keep_finished: dt.timedelta = FINISHED_UPLOAD_TTL,
        abandon_after: dt.timedelta = ABANDONED_UPLOAD_TTL,
    ) -> list[Path]:
        """Delete what a crash can leave behind; call once at startup, before serving.

        Removes temporary files, metadata of blobs that never arrived, ``.part`` files
        without an upload record and those of uploads whose artifact is stored, and the
        records of finished uploads older than ``keep_finished`` (kept until then so that a
        client's repeated FinishUpload still answers). Unfinished uploads stay, their
        ``.part`` length being their durable offset, unless no chunk arrived for
        ``abandon_after``: then the upload is abandoned and its disk space freed (a client
        coming back later starts over). Returns what was removed.
        """
        removed: list[Path] = []
        now = utc_now()
        cutoff = now - keep_finished
        stale = (now - abandon_after).timestamp()
        with self._lock:
            for upload_id, record in list(self._records.items()):
                stored = (self.blobs / parse_digest(record.digest)).exists()
                if stored and dt.datetime.fromisoformat(record.created) < cutoff:
                    removed.append(self._meta_path(upload_id))
                    del self._records[upload_id]
                    continue
                part = self.uploads / f"{upload_id}.part"
                touched = part.stat().st_mtime if part.exists() else 0.0
                if not stored and touched < stale:
                    removed.append(self._meta_path(upload_id))
                    del self._records[upload_id]
            for folder in (self.blobs, self.uploads):
                for path in folder.iterdir():
                    if path.name.startswith((_TMP, f".{_TMP}")) or is_temporary(path.name):
                        removed.append(path)
            for meta in self.blobs.glob("*.json"):
                if not (self.blobs / meta.stem).exists():
                    removed.append(meta)
            for part in self.uploads.glob("*.part"):
                pending = self._records.get(part.stem)
                if pending is None or (self.blobs / parse_digest(pending.digest)).exists():
                    removed.append(part)
            for path in removed:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            fsync_dir(self.blobs)
            fsync_dir(self.uploads)
        for path in removed:
            log.warning("recovery removed %s", path)
        return removed

    # --- internals -------------------------------------------------------------------------

    def _check_same(self, have: ArtifactInfo, kind: ArtifactKind, size: int) -> None:
        if have.kind != kind or have.size != size:
            raise InvalidInputError(
                f"artifact {have.digest} is known as a {have.kind.label} of {have.size} bytes, "
                f"not a {kind.label} of {size} bytes"
            )

    def _meta_path(self, upload_id: str) -> Path:
        return self.uploads / f"{upload_id}.json"

    def _part_path(self, upload_id: str) -> Path:
        return self.uploads / f"{upload_id}.part"

    @staticmethod
    def _read_record(meta: Path) -> _Upload:
        data = json.loads(meta.read_text("utf-8"))
        return _Upload(
            upload_id=data["upload_id"],
            kind=ArtifactKind[data["kind"]],
            size=int(data["size"]),
            digest=data["digest"],
            owner=data["owner"],
            created=data["created"],
        )

    def _record(self, upload_id: str, owner: str | None) -> _Upload:
        with self._lock:
            record = self._records.get(upload_id)
        if record is None:
            raise UnknownUploadError(f"no upload with id {upload_id!r}; start a new one")
        if owner is not None and record.owner != owner:
            raise UploadPermissionError(f"upload {upload_id} belongs to another organisation")
        return record

    def _upload_lock(self, upload_id: str) -> threading.Lock:
        with self._lock:
            return self._upload_locks.setdefault(upload_id, threading.Lock())

    def _state(self, record: _Upload) -> UploadState:
        complete = record.digest in self
        if complete:
            offset = record.size
        else:
            part = self._part_path(record.upload_id)
            offset = part.stat().st_size if part.exists() else 0
        return UploadState(
            upload_id=record.upload_id,
            kind=record.kind,
            size=record.size,
            digest=record.digest,
            owner=record.owner,
            offset=offset,
            max_chunk_bytes=self.max_chunk_bytes,
            complete=complete,
        )

    def _discard(self, upload_id: str) -> None:
        with self._lock:
            self._records.pop(upload_id, None)
            self._part_path(upload_id).unlink(missing_ok=True)
            self._meta_path(upload_id).unlink(missing_ok=True)
            fsync_dir(self.uploads)

    def _commit(
        self,
        src: Path,
        digest: str,
        kind: ArtifactKind,
        size: int,
        uploaded_by: str | None = None,
    ) -> ArtifactInfo:
        """Move a verified file into ``blobs/`` (metadata first, then the blob's rename).

        ``uploaded_by``: the organisation whose upload it was (kept in the metadata, so that
        the bundle can be served to it before it is submitted)."""
        hexd = parse_digest(digest)
        with self._lock:
            blob = self.blobs / hexd
            if blob.exists():  # stored meanwhile (another owner, the same bytes): keep that
                src.unlink(missing_ok=True)
            else:
                meta = {"digest": digest, "kind": kind.name, "size": size, "created": utc_now_iso()}
                if uploaded_by is not None:
                    meta["uploaded_by"] = uploaded_by
                _write_json_atomic(self.blobs / f"{hexd}.json", meta)
                os.chmod(src, 0o444)
                os.rename(src, blob)
                fsync_dir(self.blobs)
        return self.info(digest)
