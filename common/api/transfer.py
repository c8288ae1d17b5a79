"""Client side of the data plane: upload and download artifacts, resumably and verified.

An artifact directory is packed into one deterministic tar stream
(:mod:`flexfed.common.formats.archive`) whose SHA-256 is its digest, and sent in chunks, each
with its own SHA-256. A broken or stalled stream is resumed from the server's durable offset
(GetUpload) with exponential backoff, a bounded number of times; downloads resume from the
length of ``<out>.part``. The whole digest is checked on both sides before anything counts,
and memory stays at one chunk whatever the artifact's size.

Example::

    from flexfed.common.api.tls import secure_channel
    channel = secure_channel("coordinator:7443", "ca.pem", "cert.pem", "key.pem")
    info = upload_artifact(channel, Path("bundle/"), ArtifactKind.EXPERT_BUNDLE)
    download_artifact(channel, anchor_digest, Path("anchor/"))
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc

from flexfed.common.errors import (
    DigestMismatchError,
    InvalidInputError,
    MissingFileError,
    TransferError,
)
from flexfed.common.formats.archive import (
    ArtifactInfo,
    ArtifactKind,
    DestinationExistsError,
    extract_archive,
    pack_directory,
    parse_digest,
    stream_digest,
)
from flexfed.common.util.fs import fsync_dir
from flexfed.common.util.progress import byte_progress
from flexfed.common.util.watchdog import IdleWatchdog
from flexfed.proto.v1 import artifact_pb2, artifact_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# Statuses after which a call is worth repeating: the network, a deadline, our own stall
# watchdog (CANCELLED), a server shutting down. (Within an Upload stream, a chunk refused as
# damaged or for the wrong offset is also resumed from the server's offset; see _upload_file.)
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)
_RESUME_UPLOAD = frozenset({grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DATA_LOSS})
# NOTE: Finishing re-reads the whole artifact on the server to hash it, so its deadline grows
# with the size (at a conservative 50 MB/s) on top of the ordinary one.
_FINISH_BYTES_PER_S = 50e6


class TransferRefusedError(TransferError):
    """The coordinator refused the call (a status that retrying would not change)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class ArtifactNotFoundError(TransferRefusedError, LookupError):
    """The coordinator holds no artifact with this digest."""


class TransferInterruptedError(TransferError):
    """A transfer kept failing after every retry; running it again resumes it."""


def info_from_proto(msg: artifact_pb2.ArtifactInfo) -> ArtifactInfo:
    return ArtifactInfo(digest=msg.digest, kind=ArtifactKind(msg.kind), size=msg.size)


def _refused(err: grpc.RpcError, what: str) -> TransferError:
    code: grpc.StatusCode = err.code()
    details = err.details()
    message = f"{what} refused by the coordinator ({code.name}): {details}"
    if code == grpc.StatusCode.NOT_FOUND:
        return ArtifactNotFoundError(message, code)
    return TransferRefusedError(message, code)


def _retryable(err: BaseException) -> bool:
    if isinstance(err, _Stalled):
        return True
    if not isinstance(err, grpc.RpcError):
        return False
    code = err.code()
    details = err.details() or ""
    # A server at its maximum_concurrent_rpcs, or with no transfer stream free for us
    # (flexfed.server.admission), answers RESOURCE_EXHAUSTED: busy, not too big.
    return code in _RETRYABLE or (
        code == grpc.StatusCode.RESOURCE_EXHAUSTED
        and ("Concurrent RPC limit" in details or details.startswith(BUSY))
    )


BUSY = "busy:"  # how the coordinator starts a refusal that ends when a stream does


class _Stalled(Exception):
    """A stream made no progress within the deadline and was cancelled."""


class _Retry:
    """A bounded budget of resumptions with exponential backoff."""

    def __init__(self, retries: int, backoff: float, what: str) -> None:
        self.left = retries
        self.backoff = backoff
        self.what = what

    def after(self, err: BaseException) -> None:
        """Sleep before the next try, or raise if ``err`` is final or the budget is spent."""
        if not _retryable(err):
            if isinstance(err, grpc.RpcError):
                raise _refused(err, self.what) from err
            raise err
        if self.left <= 0:
            raise TransferInterruptedError(
                f"{self.what} failed after every retry ({err}); run it again to resume"
            ) from err
        self.left -= 1
        log.warning("%s interrupted (%s); resuming in %.1f s", self.what, _short(err), self.backoff)
        time.sleep(self.backoff)
        self.backoff *= 2

    def call(self, fn: Callable[..., T], request: Any, timeout: float) -> T:
        """A unary call, retried on transient failures."""
        while True:
            try:
                return fn(request, timeout=timeout)
            except grpc.RpcError as err:
                self.after(err)


def _short(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err) or type(err).__name__


class _Meter:
    """Drives a progress bar to an absolute position (it can move back after a resume)."""

    def __init__(self, advance: Callable[[int], None]) -> None:
        self._advance = advance
        self._shown = 0
        self._lock = threading.Lock()

    def set(self, position: int) -> None:
        with self._lock:
            self._advance(position - self._shown)
            self._shown = position


# --- upload --------------------------------------------------------------------------------


def upload_artifact(
    channel: grpc.Channel,
    path: Path,
    kind: ArtifactKind | int,
    *,
    chunk_bytes: int | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 5,
    backoff: float = 0.5,
    tmp_dir: Path | None = None,
) -> ArtifactInfo:
    """Upload a directory (packed to a temporary tar in ``tmp_dir``) or a tar file.

    ``chunk_bytes`` caps the chunk size (the server's maximum otherwise). ``timeout`` is the
    deadline of each unary call and the longest a stream may go without progress before it
    is cancelled and resumed; at most ``retries`` resumptions follow, ``backoff`` seconds
    apart, doubling. ``kind`` may also be the proto's enum number. Returns the stored
    artifact's :class:`ArtifactInfo`.
    """
    try:
        kind = ArtifactKind(kind)
    except ValueError as err:
        raise InvalidInputError(f"artifact kind {kind!r} is not valid") from err
    path = Path(path)
    if path.is_dir():
        with tempfile.TemporaryDirectory(prefix="flexfed-upload-", dir=tmp_dir) as tmp:
            packed = pack_directory(path, Path(tmp) / f"{path.name or 'artifact'}.tar")
            return _upload_file(
                channel, packed.path, packed.digest, packed.size, kind, path.name,
                chunk_bytes, progress, timeout, _Retry(retries, backoff, f"upload of {path}"),
            )  # fmt: skip
    if not path.is_file():
        raise MissingFileError(f"{path} is neither a directory nor a file")
    with open(path, "rb") as f:
        digest, size = stream_digest(f)
    return _upload_file(
        channel, path, digest, size, kind, path.name,
        chunk_bytes, progress, timeout, _Retry(retries, backoff, f"upload of {path}"),
    )  # fmt: skip


def _upload_file(
    channel: grpc.Channel,
    tar: Path,
    digest: str,
    size: int,
    kind: ArtifactKind,
    label: str,
    chunk_bytes: int | None,
    progress: bool,
    timeout: float,
    retry: _Retry,
) -> ArtifactInfo:
    stub = artifact_pb2_grpc.ArtifactServiceStub(channel)
    start = artifact_pb2.StartUploadRequest(
        kind=artifact_pb2.ArtifactKind.ValueType(kind), size=size, digest=digest
    )
    state = retry.call(stub.StartUpload, start, timeout)
    if state.complete and not state.upload_id:
        log.info("%s is already on the coordinator; nothing to send", digest)
        return info_from_proto(
            retry.call(stub.GetArtifact, artifact_pb2.GetArtifactRequest(digest=digest), timeout)
        )
    chunk = min(chunk_bytes or state.max_chunk_bytes, state.max_chunk_bytes)
    fd = os.open(tar, os.O_RDONLY)
    try:
        with byte_progress(f"upload {label}", size, progress) as advance:
            meter = _Meter(advance)
            meter.set(state.offset)
            while not state.complete and state.offset < size:
                try:
                    state = _send(stub, fd, state, size, chunk, timeout, meter)
                except (grpc.RpcError, _Stalled) as err:
                    # NOTE: a wrong offset (an older stream of ours got there first) or a
                    # chunk damaged on the way: ask the server where to go on from, as after
                    # a break. Both use up a retry, so a persistent fault still ends.
                    resync = isinstance(err, grpc.RpcError) and err.code() in _RESUME_UPLOAD
                    retry.after(_Stalled(_short(err)) if resync else err)
                    get = artifact_pb2.GetUploadRequest(upload_id=state.upload_id)
                    state = retry.call(stub.GetUpload, get, timeout)
                meter.set(state.offset)
            finish = artifact_pb2.FinishUploadRequest(upload_id=state.upload_id)
            try:
                info = retry.call(stub.FinishUpload, finish, timeout + size / _FINISH_BYTES_PER_S)
            except TransferRefusedError as err:
                if err.code == grpc.StatusCode.DATA_LOSS:  # the whole digest did not match
                    raise DigestMismatchError(
                        f"the coordinator received bytes that do not hash to {digest} and "
                        f"discarded them; was {tar} changed during the upload? ({err})"
                    ) from err
                raise
    finally:
        os.close(fd)
    return info_from_proto(info)


def _send(
    stub: artifact_pb2_grpc.ArtifactServiceStub,
    fd: int,
    state: artifact_pb2.UploadState,
    size: int,
    chunk: int,
    timeout: float,
    meter: _Meter,
) -> artifact_pb2.UploadState:
    """One Upload stream from the server's offset to the end; returns the server's state."""
    watchdog = IdleWatchdog(timeout, name="transfer-watch")
    failed: list[BaseException] = []

    def requests() -> Iterator[artifact_pb2.UploadChunk]:
        offset = state.offset
        while offset < size:
            # NOTE: pread, not seek+read: a cancelled stream's generator may still be running
            # in gRPC's thread while the next stream reads the same descriptor.
            data = os.pread(fd, min(chunk, size - offset), offset)
            if not data:
                failed.append(TransferError(f"the artifact shrank during the upload ({offset})"))
                return
            watchdog.kick()
            yield artifact_pb2.UploadChunk(
                upload_id=state.upload_id,
                offset=offset,
                data=data,
                chunk_sha256=hashlib.sha256(data).hexdigest(),
            )
            offset += len(data)
            meter.set(offset)

    call = stub.Upload.future(requests())
    watchdog.on_idle = call.cancel
    with watchdog:
        try:
            result: artifact_pb2.UploadState = call.result()
        except grpc.FutureCancelledError as err:
            raise _Stalled(f"no progress for {timeout:.0f} s") from err
    if failed:
        raise failed[0]
    return result


# --- download ------------------------------------------------------------------------------


def download_artifact(
    channel: grpc.Channel,
    digest: str,
    out: Path,
    *,
    extract: bool = True,
    progress: bool = True,
    timeout: float = 60.0,
    retries: int = 5,
    backoff: float = 0.5,
) -> Path:
    """Download an artifact into ``out``: a new directory (``extract``) or the tar file.

    The stream goes to ``<out>.part`` and resumes from its length, on a retry here or on a
    later call; every chunk's and then the whole SHA-256 are checked, and ``out`` appears
    atomically only when all is verified. ``timeout``, ``retries`` and ``backoff`` as for
    :func:`upload_artifact`.
    """
    parse_digest(digest)
    out = Path(out)
    if out.exists():
        raise DestinationExistsError(f"{out} already exists; choose a new output path")
    part = out.with_name(out.name + ".part")
    retry = _Retry(retries, backoff, f"download of {digest}")
    stub = artifact_pb2_grpc.ArtifactServiceStub(channel)
    info = info_from_proto(
        retry.call(stub.GetArtifact, artifact_pb2.GetArtifactRequest(digest=digest), timeout)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with byte_progress(f"download {out.name}", info.size, progress) as advance:
        meter = _Meter(advance)
        if not _fetch(stub, info, part, timeout, retry, meter):
            # NOTE: a stale <out>.part (another artifact, or damaged) only shows in the whole
            # digest; it is discarded and the download starts over, once.
            log.warning("%s did not verify; downloading %s from the start", part, digest)
            part.unlink()
            if not _fetch(stub, info, part, timeout, retry, meter):
                part.unlink()
                raise DigestMismatchError(f"the download of {digest} does not hash to it")
    if extract:
        extract_archive(part, out, max_bytes=info.size)
        part.unlink()
    else:
        os.rename(part, out)
    fsync_dir(out.parent)
    return out


def _fetch(
    stub: artifact_pb2_grpc.ArtifactServiceStub,
    info: ArtifactInfo,
    part: Path,
    timeout: float,
    retry: _Retry,
    meter: _Meter,
) -> bool:
    """Fill ``part`` up to ``info.size`` bytes; True if the whole matches ``info.digest``."""
    if part.exists() and part.stat().st_size > info.size:
        part.unlink()
    h = hashlib.sha256()
    with open(part, "ab+") as f:
        f.seek(0)
        while chunk := f.read(1 << 20):
            h.update(chunk)
        offset = f.tell()
        meter.set(offset)
        while offset < info.size:
            request = artifact_pb2.DownloadRequest(digest=info.digest, offset=offset)
            call = stub.Download(request)
            with IdleWatchdog(timeout, call.cancel, "transfer-watch") as watchdog:
                try:
                    for msg in call:
                        watchdog.kick()
                        if msg.HasField("artifact") and info_from_proto(msg.artifact) != info:
                            raise TransferError(f"the coordinator changed {info.digest}'s info")
                        if msg.offset != offset:
                            raise TransferError(
                                f"the coordinator sent offset {msg.offset}, expected {offset}"
                            )
                        if hashlib.sha256(msg.data).hexdigest() != msg.chunk_sha256:
                            raise _Stalled(f"chunk at offset {offset} arrived damaged")
                        f.write(msg.data)
                        h.update(msg.data)
                        offset += len(msg.data)
                        meter.set(offset)
                    if offset < info.size:
                        raise _Stalled(f"the stream ended at {offset} of {info.size} bytes")
                except (grpc.RpcError, _Stalled) as err:
                    f.flush()
                    stalled = _Stalled(f"no progress for {timeout:.0f} s")
                    retry.after(stalled if watchdog.stalled else err)
        f.flush()
        os.fsync(f.fileno())
    return "sha256:" + h.hexdigest() == info.digest
