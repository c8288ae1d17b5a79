"""The Consortium API's data plane: ``ArtifactService`` over the :class:`ArtifactStore`.

Who may call what (roles from the caller's mTLS certificate, :mod:`flexfed.server.auth`):

- StartUpload, GetUpload, Upload, FinishUpload, CancelUpload: owners and the operator. Owners
  upload only expert bundles and see only their organisation's uploads (at most
  ``limits.uploads_per_member`` unfinished at once); the operator any kind, any upload.
- GetArtifact, Download: every member (owners, auditors, the operator), for the artifacts
  the read policy gives it (:mod:`flexfed.server.access`: a bundle to its organisation, a
  release to owners while its experts stay, ...); otherwise ``PERMISSION_DENIED``.

Errors become statuses a client can act on: a malformed argument ``INVALID_ARGUMENT``, a size
over the limit ``RESOURCE_EXHAUSTED``, a chunk for the wrong offset ``FAILED_PRECONDITION``
(the message names the offset to resume from), a chunk or an artifact that does not match its
SHA-256 ``DATA_LOSS``, an unknown upload or artifact ``NOT_FOUND``, another organisation's
upload ``PERMISSION_DENIED``, a download offset past the end ``OUT_OF_RANGE``.

Streams and threads: every chunk of an Upload stream is written and fsynced before the next
is read, so a stream that breaks midway loses nothing that was counted; the client asks
GetUpload for the offset and resumes. Each stream occupies one thread of the server's pool
while it lives, and a stalled client (one that opens a stream and sends or reads nothing)
holds only its own thread; no lock is held while waiting for a client. Streams are admitted
per member and in all by :class:`~flexfed.server.admission.StreamSlots`, which keeps threads
free for the short calls; the server is built with ``maximum_concurrent_rpcs`` and keepalive
options so that dead peers are noticed; clients (:mod:`flexfed.common.api.transfer`) cancel a
stream that makes no progress within their deadline and resume it. The server cancels a
stream that makes no progress for ``idle_seconds`` (``limits.stream_idle_seconds``)
itself, whatever deadline the client chose: otherwise as many stalled streams as there are
workers would stop every call of every member.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from typing import NoReturn

import grpc

from flexfed.common.errors import DigestMismatchError, FlexfedError, InvalidInputError
from flexfed.common.formats.archive import ArtifactInfo, ArtifactKind
from flexfed.common.util.watchdog import IdleWatchdog
from flexfed.proto.v1 import artifact_pb2, artifact_pb2_grpc
from flexfed.server.admission import StreamLimitError, StreamSlots
from flexfed.server.auth import Authorizer, Caller, abort, status_of
from flexfed.server.config import DEFAULT_STREAM_IDLE_SECONDS
from flexfed.server.store import (
    ArtifactStore,
    ArtifactTooLargeError,
    OffsetMismatchError,
    UnknownArtifactError,
    UnknownUploadError,
    UploadCompleteError,
    UploadIncompleteError,
    UploadPermissionError,
    UploadQuotaError,
    UploadState,
)

log = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of gives its status.
_STATUS: list[tuple[type[FlexfedError], grpc.StatusCode]] = [
    (ArtifactTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StreamLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UploadQuotaError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnknownUploadError, grpc.StatusCode.NOT_FOUND),
    (UnknownArtifactError, grpc.StatusCode.NOT_FOUND),
    (UploadPermissionError, grpc.StatusCode.PERMISSION_DENIED),
    (OffsetMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (UploadIncompleteError, grpc.StatusCode.FAILED_PRECONDITION),
    (DigestMismatchError, grpc.StatusCode.DATA_LOSS),
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(err: FlexfedError) -> grpc.StatusCode:
    """The gRPC status a store error is reported with."""
    for cls, code in _STATUS:
        if isinstance(err, cls):
            return code
    return status_of(err)


def info_to_proto(info: ArtifactInfo) -> artifact_pb2.ArtifactInfo:
    return artifact_pb2.ArtifactInfo(
        digest=info.digest, kind=artifact_pb2.ArtifactKind.ValueType(info.kind), size=info.size
    )


def _state_to_proto(state: UploadState) -> artifact_pb2.UploadState:
    return artifact_pb2.UploadState(
        upload_id=state.upload_id,
        offset=state.offset,
        size=state.size,
        digest=state.digest,
        max_chunk_bytes=state.max_chunk_bytes,
        complete=state.complete,
    )


def _idle_cancel(context: grpc.ServicerContext, limit: float, what: str) -> IdleWatchdog:
    """A watchdog that cancels a stream when it made no progress for ``limit`` seconds.

    FIX (found by tests/integration/test_load.py): a client that opens a stream and then
    neither sends nor reads held a worker thread until its own deadline (any length), so
    ``limits.workers`` such streams froze the whole server. Cancelling frees the thread;
    whatever was counted is durable and the client resumes.
    """

    def cancel() -> None:
        log.warning("%s: no progress for %.0f s; cancelled", what, limit)
        context.cancel()

    return IdleWatchdog(limit, cancel, "stream-idle")


def _kind(context: grpc.ServicerContext, value: int) -> ArtifactKind:
    try:
        return ArtifactKind(value)
    except ValueError:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"artifact kind {value} is not valid")
        raise  # unreachable: abort raises


class ArtifactServicer(artifact_pb2_grpc.ArtifactServiceServicer):  # type: ignore[misc,unused-ignore]
    """Uploads into and downloads from the coordinator's :class:`ArtifactStore`."""

    def __init__(
        self,
        store: ArtifactStore,
        authorizer: Authorizer,
        *,
        idle_seconds: float = DEFAULT_STREAM_IDLE_SECONDS,
        slots: StreamSlots | None = None,
        max_bundle_bytes: int | None = None,
        may_read: Callable[[Caller, ArtifactInfo], str | None] | None = None,
        uploads_per_member: int | None = None,
    ) -> None:
        self.store = store
        self.auth = authorizer
        self.idle_seconds = idle_seconds  # a stream without progress this long is cancelled
        # Transfer streams open at once, per member and in all (flexfed.server.admission).
        self.slots = slots or StreamSlots(total=1 << 30, per_member=1 << 30)
        # The largest valid expert bundle for the anchor: an owner's upload above it can
        # only be refused at submission, so it is refused before a byte is stored.
        self.max_bundle_bytes = max_bundle_bytes
        # Who may read which artifact (flexfed.server.access): why not, or None. Without one,
        # every member reads everything (the data plane alone, as in its own tests).
        self.may_read = may_read
        self.uploads_per_member = uploads_per_member  # unfinished uploads an owner may hold

    # --- helpers ---------------------------------------------------------------------------

    def _fail(self, context: grpc.ServicerContext, err: FlexfedError) -> NoReturn:
        code = status_for(err)
        log.info("artifact call refused (%s): %s", code.name, err)
        abort(context, code, str(err))
        raise AssertionError("unreachable: abort raises")

    def _uploader(self, context: grpc.ServicerContext) -> tuple[Caller, str | None]:
        """The caller and the owner key the store checks (``None`` for the operator)."""
        caller = self.auth.require(context, "owner")
        return caller, (None if caller.role == "operator" else caller.org)

    # --- uploads ---------------------------------------------------------------------------

    def StartUpload(
        self, request: artifact_pb2.StartUploadRequest, context: grpc.ServicerContext
    ) -> artifact_pb2.UploadState:
        caller, _ = self._uploader(context)
        kind = _kind(context, request.kind)
        if caller.role != "operator" and kind != ArtifactKind.EXPERT_BUNDLE:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} may upload expert bundles only, not a {kind.label}",
            )
        bound = self.max_bundle_bytes
        if kind == ArtifactKind.EXPERT_BUNDLE and bound is not None and request.size > bound:
            # FIX (issue 12): a 64 MiB "bundle" was stored for an anchor whose bundles are
            # about 3 MB; only the server-wide max_artifact_bytes bounded it.
            abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"an expert bundle for this anchor is at most {bound} bytes; "
                f"{request.size} bytes cannot be a valid one",
            )
        try:
            limit = None if caller.role == "operator" else self.uploads_per_member
            state = self.store.start_upload(
                kind, request.size, request.digest, caller.org, max_unfinished=limit
            )
        except FlexfedError as err:
            self._fail(context, err)
        return _state_to_proto(state)

    def CancelUpload(
        self, request: artifact_pb2.CancelUploadRequest, context: grpc.ServicerContext
    ) -> artifact_pb2.CancelUploadResponse:
        _, owner = self._uploader(context)
        try:
            self.store.cancel(request.upload_id, owner)
        except FlexfedError as err:
            self._fail(context, err)
        return artifact_pb2.CancelUploadResponse()

    def GetUpload(
        self, request: artifact_pb2.GetUploadRequest, context: grpc.ServicerContext
    ) -> artifact_pb2.UploadState:
        _, owner = self._uploader(context)
        try:
            return _state_to_proto(self.store.upload_state(request.upload_id, owner))
        except FlexfedError as err:
            self._fail(context, err)

    def Upload(
        self, request_iterator: Iterable[artifact_pb2.UploadChunk], context: grpc.ServicerContext
    ) -> artifact_pb2.UploadState:
        caller, owner = self._uploader(context)
        upload_id: str | None = None
        # FIX: cancelled after idle_seconds without a chunk (see _idle_cancel).
        idle = _idle_cancel(context, self.idle_seconds, f"upload stream from {caller}")
        try:
            with self.slots.hold(caller.org, "an Upload stream"), idle:
                for chunk in request_iterator:
                    if upload_id is None:
                        upload_id = chunk.upload_id
                    elif chunk.upload_id != upload_id:
                        raise InvalidInputError(
                            "every message of an Upload stream must name the same upload"
                        )
                    try:
                        self.store.append(
                            upload_id, owner, chunk.offset, chunk.data, chunk.chunk_sha256
                        )
                    except UploadCompleteError:
                        break  # the artifact is stored (e.g. by another owner): nothing to add
                    idle.kick()
        except FlexfedError as err:
            self._fail(context, err)
        except grpc.RpcError:
            # NOTE: the client went away mid-stream (or idled and was cancelled). Every chunk
            # counted so far is on disk; the client resumes from GetUpload's offset. Nobody
            # reads this answer.
            log.info("upload %s: stream from %s broke; it can resume", upload_id, caller)
            return artifact_pb2.UploadState(upload_id=upload_id or "")
        if upload_id is None:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "an Upload stream sent no chunk")
        try:
            return _state_to_proto(self.store.upload_state(upload_id, owner))
        except FlexfedError as err:
            self._fail(context, err)

    def FinishUpload(
        self, request: artifact_pb2.FinishUploadRequest, context: grpc.ServicerContext
    ) -> artifact_pb2.ArtifactInfo:
        _, owner = self._uploader(context)
        try:
            return info_to_proto(self.store.finish(request.upload_id, owner))
        except FlexfedError as err:
            self._fail(context, err)

    # --- reading ---------------------------------------------------------------------------

    def GetArtifact(
        self, request: artifact_pb2.GetArtifactRequest, context: grpc.ServicerContext
    ) -> artifact_pb2.ArtifactInfo:
        caller = self.auth.require(context, "owner", "auditor")
        try:
            info = self.store.info(request.digest)
        except FlexfedError as err:
            self._fail(context, err)
        self._check_read(context, caller, info)
        return info_to_proto(info)

    def _check_read(
        self, context: grpc.ServicerContext, caller: Caller, info: ArtifactInfo
    ) -> None:
        refusal = self.may_read(caller, info) if self.may_read is not None else None
        if refusal is not None:
            log.info("read of %s by %s refused: %s", info.digest, caller, refusal)
            abort(context, grpc.StatusCode.PERMISSION_DENIED, refusal)

    def Download(
        self, request: artifact_pb2.DownloadRequest, context: grpc.ServicerContext
    ) -> Iterator[artifact_pb2.DownloadChunk]:
        caller = self.auth.require(context, "owner", "auditor")
        with ExitStack() as held:
            try:
                held.enter_context(self.slots.hold(caller.org, "a Download stream"))
            except StreamLimitError as err:
                self._fail(context, err)
            yield from self._download(request, context, caller)

    def _download(
        self, request: artifact_pb2.DownloadRequest, context: grpc.ServicerContext, caller: Caller
    ) -> Iterator[artifact_pb2.DownloadChunk]:
        try:
            info = self.store.info(request.digest)
        except FlexfedError as err:
            self._fail(context, err)
        self._check_read(context, caller, info)
        try:
            blob = self.store.open(request.digest)
        except FlexfedError as err:
            self._fail(context, err)
        with blob:
            if request.offset > info.size:
                abort(
                    context,
                    grpc.StatusCode.OUT_OF_RANGE,
                    f"offset {request.offset} is past the end of {info.digest} ({info.size} bytes)",
                )
            end = (
                info.size
                if request.length == 0
                else min(info.size, request.offset + request.length)
            )
            pos = request.offset
            blob.seek(pos)
            first: artifact_pb2.ArtifactInfo | None = info_to_proto(info)
            # FIX: a reader that stops reading is cancelled after idle_seconds (_idle_cancel).
            idle = _idle_cancel(context, self.idle_seconds, f"download of {info.digest}")
            # NOTE: a yield returns only once gRPC has sent the message (flow control), so at
            # most one chunk per stream is in memory, however slowly the client reads.
            with idle:
                while first is not None or pos < end:
                    data = blob.read(min(self.store.max_chunk_bytes, end - pos))
                    if pos < end and not data:
                        abort(context, grpc.StatusCode.INTERNAL, f"{info.digest} ended early")
                    yield artifact_pb2.DownloadChunk(
                        offset=pos,
                        data=data,
                        chunk_sha256=hashlib.sha256(data).hexdigest(),
                        artifact=first,
                    )
                    idle.kick()
                    first = None
                    pos += len(data)
                    if not context.is_active():
                        return
