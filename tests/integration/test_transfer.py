"""Artifacts through a real Consortium API server with mutual TLS: uploads that resume, verify
and refuse, downloads that resume, and roles."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from consortium import Consortium, Member

from flexfed.common.api.transfer import (
    ArtifactNotFoundError,
    TransferRefusedError,
    download_artifact,
    upload_artifact,
)
from flexfed.common.errors import DigestMismatchError
from flexfed.common.formats.archive import ArtifactKind, pack_directory
from flexfed.proto.v1 import artifact_pb2, artifact_pb2_grpc
from flexfed.server.artifacts import ArtifactServicer
from flexfed.server.auth import abort
from flexfed.server.store import ArtifactStore

pytestmark = pytest.mark.integration

CHUNK = 256 * 1024
LIMIT = 16 << 20
BUNDLE = artifact_pb2.ARTIFACT_KIND_EXPERT_BUNDLE


class CountingStore(ArtifactStore):
    """The real store, counting the bytes that uploads append (to see what was resent)."""

    appended = 0

    def append(self, upload_id: str, owner: str | None, offset: int, data: bytes, sha: str) -> int:
        end = super().append(upload_id, owner, offset, data, sha)
        self.appended += len(data)
        return end


class Servicer(ArtifactServicer):
    """The real servicer, counting downloaded bytes; ``break_upload_after`` chunks of the
    next Upload stream it ends the stream with UNAVAILABLE, as a dropped connection would,
    and ``stall_download`` makes the next Download send one chunk and then hang."""

    served = 0
    break_upload_after: int | None = None
    stall_download = False
    faults = 0  # how many of the above happened
    on_break: Callable[[], None] = staticmethod(lambda: None)

    def Upload(self, request_iterator, context):  # type: ignore[no-untyped-def]
        limit, self.break_upload_after = self.break_upload_after, None
        if limit is None:
            return super().Upload(request_iterator, context)

        def until_break() -> Iterator[artifact_pb2.UploadChunk]:
            for i, chunk in enumerate(request_iterator):
                if i == limit:
                    self.faults += 1
                    self.on_break()
                    abort(context, grpc.StatusCode.UNAVAILABLE, "connection dropped (test)")
                yield chunk

        return super().Upload(until_break(), context)

    def Download(self, request, context):  # type: ignore[no-untyped-def]
        stall, self.stall_download = self.stall_download, False
        for i, msg in enumerate(super().Download(request, context)):
            if stall and i == 1:
                self.faults += 1
                while context.is_active():
                    time.sleep(0.05)  # hang until the client gives up
                return
            self.served += len(msg.data)
            yield msg


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store", max_artifact_bytes=LIMIT, max_chunk_bytes=CHUNK)


@pytest.fixture
def servicer(consortium: Consortium, store: CountingStore) -> Servicer:
    return Servicer(store, consortium.authorizer())


@pytest.fixture
def address(servicer: Servicer, serve: Callable[..., str]) -> str:
    return serve(lambda s: artifact_pb2_grpc.add_ArtifactServiceServicer_to_server(servicer, s))


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    """An expert-bundle-shaped directory of ~3 MB: 12 chunks."""
    root = tmp_path / "bundle"
    (root / "extra").mkdir(parents=True)
    (root / "expert.safetensors").write_bytes(os.urandom(3_000_000))
    (root / "expert.json").write_text('{"org": "acme"}\n')
    (root / "extra" / "notes.txt").write_text("hello\n")
    return root


def stub_for(consortium: Consortium, address: str, member: Member):  # type: ignore[no-untyped-def]
    return artifact_pb2_grpc.ArtifactServiceStub(consortium.channel(address, member))


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


def chunks(data: bytes, upload_id: str, start: int = 0) -> Iterator[artifact_pb2.UploadChunk]:
    for offset in range(start, len(data), CHUNK):
        piece = data[offset : offset + CHUNK]
        yield artifact_pb2.UploadChunk(
            upload_id=upload_id,
            offset=offset,
            data=piece,
            chunk_sha256=hashlib.sha256(piece).hexdigest(),
        )


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


def start(stub, tar: Path, digest: str, kind: int = BUNDLE):  # type: ignore[no-untyped-def]
    request = artifact_pb2.StartUploadRequest(kind=kind, size=tar.stat().st_size, digest=digest)
    return stub.StartUpload(request, timeout=10)


# --- round trip ----------------------------------------------------------------------------


def test_round_trip_of_a_multi_chunk_directory_is_byte_exact(
    consortium: Consortium, address: str, store: CountingStore, bundle: Path, tmp_path: Path
) -> None:
    owner = consortium.channel(address, consortium.acme)
    info = upload_artifact(owner, bundle, ArtifactKind.EXPERT_BUNDLE, progress=False)
    packed = pack_directory(bundle, tmp_path / "local.tar")
    assert (info.digest, info.size, info.kind) == (packed.digest, packed.size, 2)
    assert store.appended == packed.size and packed.size > 10 * CHUNK
    assert store.info(info.digest) == info

    auditor = consortium.channel(address, consortium.auditor)
    out = download_artifact(auditor, info.digest, tmp_path / "fetched", progress=False)
    assert tree(out) == tree(bundle)
    assert not (tmp_path / "fetched.part").exists()
    tar = download_artifact(auditor, info.digest, tmp_path / "f.tar", extract=False, progress=False)
    assert tar.read_bytes() == packed.path.read_bytes()

    # The same bytes again, from another owner: already stored, nothing is sent.
    store.appended = 0
    other = consortium.channel(address, consortium.globex)
    assert upload_artifact(other, packed.path, ArtifactKind.EXPERT_BUNDLE, progress=False) == info
    assert store.appended == 0


# --- interruption and resumption -----------------------------------------------------------


def test_an_interrupted_upload_resumes_and_sends_only_the_missing_bytes(
    consortium: Consortium, address: str, store: CountingStore, bundle: Path, tmp_path: Path
) -> None:
    packed = pack_directory(bundle, tmp_path / "b.tar")
    data = packed.path.read_bytes()
    stub = stub_for(consortium, address, consortium.acme)
    state = start(stub, packed.path, packed.digest)

    def three_chunks_then_crash() -> Iterator[artifact_pb2.UploadChunk]:
        it = chunks(data, state.upload_id)
        for _ in range(3):
            yield next(it)
        get = artifact_pb2.GetUploadRequest(upload_id=state.upload_id)
        while stub.GetUpload(get, timeout=10).offset < 3 * CHUNK:
            time.sleep(0.01)  # wait until the server made them durable, then die
        raise RuntimeError("client crashed")

    with pytest.raises(grpc.RpcError):
        stub.Upload(three_chunks_then_crash(), timeout=10)
    get = artifact_pb2.GetUploadRequest(upload_id=state.upload_id)
    assert stub.GetUpload(get, timeout=10).offset == 3 * CHUNK
    assert packed.digest not in store

    store.appended = 0
    channel = consortium.channel(address, consortium.acme)
    info = upload_artifact(channel, packed.path, ArtifactKind.EXPERT_BUNDLE, progress=False)
    assert info.digest == packed.digest
    assert store.appended == len(data) - 3 * CHUNK


def test_the_client_resumes_a_stream_the_network_dropped(
    consortium: Consortium,
    address: str,
    store: CountingStore,
    servicer: Servicer,
    bundle: Path,
    tmp_path: Path,
) -> None:
    servicer.break_upload_after = 4
    channel = consortium.channel(address, consortium.acme)
    info = upload_artifact(
        channel, bundle, ArtifactKind.EXPERT_BUNDLE, progress=False, backoff=0.05
    )
    assert info.digest == pack_directory(bundle, tmp_path / "b.tar").digest
    assert servicer.faults == 1
    assert store.appended == info.size  # no chunk was written twice


def test_a_file_changed_during_the_upload_fails_the_whole_digest(
    consortium: Consortium, servicer: Servicer, address: str, store: CountingStore, tmp_path: Path
) -> None:
    tar = tmp_path / "a.tar"
    tar.write_bytes(os.urandom(8 * CHUNK))

    def tamper() -> None:  # while the client is away, its file changes (same size)
        with open(tar, "r+b") as f:
            f.seek(7 * CHUNK)
            f.write(b"changed")

    servicer.break_upload_after, servicer.on_break = 2, tamper
    channel = consortium.channel(address, consortium.acme)
    with pytest.raises(DigestMismatchError, match="changed during the upload"):
        upload_artifact(channel, tar, ArtifactKind.EXPERT_BUNDLE, progress=False, backoff=0.05)
    assert servicer.faults == 1
    assert not list(store.blobs.iterdir()) and not list(store.uploads.iterdir())


def test_a_download_resumes_from_its_part_file_and_survives_a_stall(
    consortium: Consortium, address: str, store: CountingStore, servicer: Servicer, bundle: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    info = store.put_directory(bundle, ArtifactKind.EXPERT_BUNDLE)
    data = store.path(info.digest).read_bytes()
    stub = stub_for(consortium, address, consortium.globex)
    request = artifact_pb2.DownloadRequest(digest=info.digest, offset=5 * CHUNK + 7)
    received = list(stub.Download(request, timeout=10))
    assert received[0].offset == 5 * CHUNK + 7 and received[0].artifact.digest == info.digest
    assert b"".join(m.data for m in received) == data[5 * CHUNK + 7 :]
    assert all(not m.HasField("artifact") for m in received[1:])
    at_end = artifact_pb2.DownloadRequest(digest=info.digest, offset=info.size)
    (only,) = stub.Download(at_end, timeout=10)
    assert (only.data, only.artifact.size) == (b"", info.size)
    past = artifact_pb2.DownloadRequest(digest=info.digest, offset=info.size + 1)
    assert code_of(lambda: list(stub.Download(past, timeout=10)))[0] == (
        grpc.StatusCode.OUT_OF_RANGE
    )

    # A correct prefix in <out>.part: only the rest is fetched.
    channel = consortium.channel(address, consortium.globex)
    (tmp_path / "dl.tar.part").write_bytes(data[: 7 * CHUNK + 3])
    servicer.served = 0
    out = download_artifact(
        channel, info.digest, tmp_path / "dl.tar", extract=False, progress=False
    )
    assert out.read_bytes() == data and servicer.served == len(data) - (7 * CHUNK + 3)

    # A stale prefix (other bytes) is detected by the whole digest, discarded and refetched;
    # a server that hangs mid-stream is cancelled by the client's deadline and resumed.
    (tmp_path / "dl2.part").write_bytes(b"not these bytes" * 1000)
    servicer.stall_download = True
    out = download_artifact(channel, info.digest, tmp_path / "dl2", timeout=1, progress=False)
    assert tree(out) == tree(bundle) and servicer.faults == 1


# --- refusals ------------------------------------------------------------------------------


def test_a_corrupt_chunk_is_data_loss_and_nothing_is_stored(
    consortium: Consortium, address: str, store: CountingStore, bundle: Path, tmp_path: Path
) -> None:
    packed = pack_directory(bundle, tmp_path / "b.tar")
    stub = stub_for(consortium, address, consortium.acme)
    state = start(stub, packed.path, packed.digest)
    first = next(chunks(packed.path.read_bytes(), state.upload_id))
    bad = artifact_pb2.UploadChunk(
        upload_id=first.upload_id,
        offset=0,
        data=b"\0" + first.data[1:],
        chunk_sha256=first.chunk_sha256,
    )
    code, _ = code_of(lambda: stub.Upload(iter([bad]), timeout=10))
    assert code == grpc.StatusCode.DATA_LOSS
    get = artifact_pb2.GetUploadRequest(upload_id=state.upload_id)
    assert stub.GetUpload(get, timeout=10).offset == 0
    assert store.appended == 0 and packed.digest not in store

    # A chunk for the wrong offset: FAILED_PRECONDITION, naming the offset to resume from.
    later = list(chunks(packed.path.read_bytes(), state.upload_id, start=CHUNK))[:1]
    code, details = code_of(lambda: stub.Upload(iter(later), timeout=10))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "offset 0" in details


def test_bytes_that_miss_the_promised_digest_are_discarded_at_finish(
    consortium: Consortium, address: str, store: CountingStore, bundle: Path, tmp_path: Path
) -> None:
    packed = pack_directory(bundle, tmp_path / "b.tar")
    data = packed.path.read_bytes()
    stub = stub_for(consortium, address, consortium.acme)
    promised = "sha256:" + hashlib.sha256(data[::-1]).hexdigest()  # same size, other bytes
    state = start(stub, packed.path, promised)
    assert stub.Upload(chunks(data, state.upload_id), timeout=10).offset == len(data)
    finish = artifact_pb2.FinishUploadRequest(upload_id=state.upload_id)
    assert code_of(lambda: stub.FinishUpload(finish, timeout=10))[0] == grpc.StatusCode.DATA_LOSS
    get = artifact_pb2.GetUploadRequest(upload_id=state.upload_id)
    assert code_of(lambda: stub.GetUpload(get, timeout=10))[0] == grpc.StatusCode.NOT_FOUND
    assert promised not in store and packed.digest not in store


def test_bad_arguments_sizes_and_kinds_are_refused(
    consortium: Consortium, address: str, bundle: Path, tmp_path: Path
) -> None:
    packed = pack_directory(bundle, tmp_path / "b.tar")
    acme = stub_for(consortium, address, consortium.acme)
    oversize = artifact_pb2.StartUploadRequest(kind=BUNDLE, size=LIMIT + 1, digest=packed.digest)
    assert code_of(lambda: acme.StartUpload(oversize, timeout=10))[0] == (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    malformed = artifact_pb2.StartUploadRequest(kind=BUNDLE, size=10, digest="sha256:abc")
    assert code_of(lambda: acme.StartUpload(malformed, timeout=10))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    no_kind = artifact_pb2.StartUploadRequest(size=10, digest=packed.digest)
    assert code_of(lambda: acme.StartUpload(no_kind, timeout=10))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    anchor = artifact_pb2.ARTIFACT_KIND_ANCHOR
    assert code_of(lambda: start(acme, packed.path, packed.digest, anchor))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    operator = stub_for(consortium, address, consortium.operator)
    assert not start(operator, packed.path, packed.digest, anchor).complete

    auditor = stub_for(consortium, address, consortium.auditor)
    assert code_of(lambda: start(auditor, packed.path, packed.digest))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    unknown = artifact_pb2.GetArtifactRequest(digest="sha256:" + "0" * 64)
    assert code_of(lambda: auditor.GetArtifact(unknown, timeout=10))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    download = artifact_pb2.DownloadRequest(digest=unknown.digest)
    assert code_of(lambda: list(auditor.Download(download, timeout=10)))[0] == (
        grpc.StatusCode.NOT_FOUND
    )
    channel = consortium.channel(address, consortium.auditor)
    with pytest.raises(ArtifactNotFoundError, match="NOT_FOUND"):
        download_artifact(channel, unknown.digest, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.part").exists()

    # The client turns refusals into one clear error that names the status.
    with pytest.raises(TransferRefusedError, match="PERMISSION_DENIED") as refused:
        upload_artifact(channel, packed.path, ArtifactKind.EXPERT_BUNDLE, progress=False)
    assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
    big = tmp_path / "big.tar"
    with open(big, "wb") as f:
        f.truncate(LIMIT + 1)
    owner = consortium.channel(address, consortium.acme)
    with pytest.raises(TransferRefusedError, match="RESOURCE_EXHAUSTED"):
        upload_artifact(owner, big, ArtifactKind.EXPERT_BUNDLE, progress=False)


def test_an_owner_cannot_see_or_continue_another_owners_upload(
    consortium: Consortium, address: str, bundle: Path, tmp_path: Path
) -> None:
    packed = pack_directory(bundle, tmp_path / "b.tar")
    acme = stub_for(consortium, address, consortium.acme)
    globex = stub_for(consortium, address, consortium.globex)
    state = start(acme, packed.path, packed.digest)
    upload_id = state.upload_id
    get = artifact_pb2.GetUploadRequest(upload_id=upload_id)
    finish = artifact_pb2.FinishUploadRequest(upload_id=upload_id)
    first = list(chunks(packed.path.read_bytes(), upload_id))[:1]
    for call in (
        lambda: globex.GetUpload(get, timeout=10),
        lambda: globex.Upload(iter(first), timeout=10),
        lambda: globex.FinishUpload(finish, timeout=10),
    ):
        assert code_of(call)[0] == grpc.StatusCode.PERMISSION_DENIED
    # globex's own upload of the same bytes is a separate one; the operator sees acme's.
    assert start(globex, packed.path, packed.digest).upload_id != upload_id
    operator = stub_for(consortium, address, consortium.operator)
    assert operator.GetUpload(get, timeout=10).offset == 0
    missing = artifact_pb2.GetUploadRequest(upload_id="f" * 32)
    assert code_of(lambda: acme.GetUpload(missing, timeout=10))[0] == grpc.StatusCode.NOT_FOUND


# --- concurrency ---------------------------------------------------------------------------


def test_a_stalled_uploader_blocks_nobody(
    consortium: Consortium, address: str, store: CountingStore, bundle: Path, tmp_path: Path
) -> None:
    packed = pack_directory(bundle, tmp_path / "b.tar")
    acme = stub_for(consortium, address, consortium.acme)
    state = start(acme, packed.path, packed.digest)
    release = threading.Event()

    def one_chunk_then_silence() -> Iterator[artifact_pb2.UploadChunk]:
        yield next(chunks(packed.path.read_bytes(), state.upload_id))
        release.wait(30)

    stalled = acme.Upload.future(one_chunk_then_silence(), timeout=30)
    try:
        # Another owner uploads in full, and acme itself resumes its upload on a new stream.
        other = tmp_path / "other"
        other.mkdir()
        (other / "expert.safetensors").write_bytes(os.urandom(600_000))
        globex = consortium.channel(address, consortium.globex)
        assert upload_artifact(globex, other, ArtifactKind.EXPERT_BUNDLE, progress=False).size
        channel = consortium.channel(address, consortium.acme)
        info = upload_artifact(channel, packed.path, ArtifactKind.EXPERT_BUNDLE, progress=False)
        assert info.digest == packed.digest
        assert not stalled.done()  # still open: it held no lock anyone needed
    finally:
        stalled.cancel()
        release.set()
