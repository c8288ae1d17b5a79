"""The content-addressed store without gRPC: resumable verified uploads, refusals, recovery."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import threading
from pathlib import Path

import pytest

from flexfed.common.errors import DigestMismatchError, InvalidInputError
from flexfed.common.formats.archive import (
    ArtifactKind,
    MalformedDigestError,
    format_digest,
    pack_directory,
)
from flexfed.server.store import (
    ArtifactStore,
    ArtifactTooLargeError,
    ChunkDigestError,
    OffsetMismatchError,
    UnknownArtifactError,
    UnknownUploadError,
    UploadCompleteError,
    UploadIncompleteError,
    UploadPermissionError,
)

CHUNK = 1000
BUNDLE = ArtifactKind.EXPERT_BUNDLE


def digest_of(data: bytes) -> str:
    return format_digest(hashlib.sha256(data).hexdigest())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store", max_artifact_bytes=100_000, max_chunk_bytes=CHUNK)


@pytest.fixture
def payload() -> bytes:
    return os.urandom(4500)


def send(store: ArtifactStore, upload_id: str, owner: str, data: bytes, start: int = 0) -> int:
    offset = start
    while offset < len(data):
        chunk = data[offset : offset + CHUNK]
        offset = store.append(upload_id, owner, offset, chunk, sha(chunk))
    return offset


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_upload_finish_and_read_back(store: ArtifactStore, payload: bytes) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    assert (state.offset, state.complete, state.max_chunk_bytes) == (0, False, CHUNK)
    assert len(state.upload_id) == 32
    assert send(store, state.upload_id, "acme", payload) == len(payload)
    assert digest_of(payload) not in store  # not visible before finish
    info = store.finish(state.upload_id, "acme")
    assert (info.digest, info.kind, info.size) == (digest_of(payload), BUNDLE, len(payload))
    assert store.info(info.digest) == info
    with store.open(info.digest) as f:
        assert f.read() == payload
    assert store.path(info.digest).stat().st_mode & 0o222 == 0  # blobs are read-only
    assert files_under(store.uploads) == {f"{state.upload_id}.json"}


def test_finish_is_idempotent_and_a_duplicate_upload_is_complete_at_once(
    store: ArtifactStore, payload: bytes
) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    send(store, state.upload_id, "acme", payload)
    first = store.finish(state.upload_id, "acme")
    assert store.finish(state.upload_id, "acme") == first
    assert store.upload_state(state.upload_id, "acme").complete
    again = store.start_upload(BUNDLE, len(payload), digest_of(payload), "globex")
    assert again.complete and again.offset == len(payload)
    with pytest.raises(UploadCompleteError):
        store.append(state.upload_id, "acme", len(payload), b"", sha(b""))


def test_resume_returns_the_same_upload_with_its_durable_offset(
    store: ArtifactStore, payload: bytes
) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    send(store, state.upload_id, "acme", payload[:2000])
    # A new store object over the same root (a restarted server) sees the same upload.
    reopened = ArtifactStore(store.root, max_artifact_bytes=100_000, max_chunk_bytes=CHUNK)
    resumed = reopened.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    assert (resumed.upload_id, resumed.offset) == (state.upload_id, 2000)
    send(reopened, resumed.upload_id, "acme", payload, start=resumed.offset)
    assert reopened.finish(resumed.upload_id, "acme").digest == digest_of(payload)


def test_a_wrong_offset_is_refused_with_the_expected_one(
    store: ArtifactStore, payload: bytes
) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    send(store, state.upload_id, "acme", payload[:1000])
    for offset in (0, 2000):
        chunk = payload[offset : offset + CHUNK]
        with pytest.raises(OffsetMismatchError, match="offset 1000") as err:
            store.append(state.upload_id, "acme", offset, chunk, sha(chunk))
        assert err.value.expected == 1000
    assert store.upload_state(state.upload_id, "acme").offset == 1000


def test_a_corrupt_chunk_is_refused_before_it_is_written(
    store: ArtifactStore, payload: bytes
) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    chunk = payload[:CHUNK]
    with pytest.raises(ChunkDigestError):
        store.append(state.upload_id, "acme", 0, b"X" + chunk[1:], sha(chunk))
    with pytest.raises(InvalidInputError, match="64 lowercase hex"):
        store.append(state.upload_id, "acme", 0, chunk, "not-a-digest")
    assert store.upload_state(state.upload_id, "acme").offset == 0
    assert store.append(state.upload_id, "acme", 0, chunk, sha(chunk)) == CHUNK


def test_oversize_uploads_chunks_and_overruns_are_refused(
    store: ArtifactStore, payload: bytes
) -> None:
    with pytest.raises(ArtifactTooLargeError, match="limit of 100000"):
        store.start_upload(BUNDLE, 100_001, digest_of(payload), "acme")
    with pytest.raises(InvalidInputError, match="positive"):
        store.start_upload(BUNDLE, 0, digest_of(payload), "acme")
    with pytest.raises(MalformedDigestError):
        store.start_upload(BUNDLE, 10, "sha256:xyz", "acme")
    state = store.start_upload(BUNDLE, 1500, digest_of(payload[:1500]), "acme")
    big = os.urandom(CHUNK + 1)
    with pytest.raises(ArtifactTooLargeError, match="chunk"):
        store.append(state.upload_id, "acme", 0, big, sha(big))
    store.append(state.upload_id, "acme", 0, payload[:1000], sha(payload[:1000]))
    tail = payload[1000:2000]  # 1000 bytes where only 500 remain
    with pytest.raises(InvalidInputError, match="past the declared size"):
        store.append(state.upload_id, "acme", 1000, tail, sha(tail))
    with pytest.raises(UploadIncompleteError, match="from offset 1000"):
        store.finish(state.upload_id, "acme")
    assert store.upload_state(state.upload_id, "acme").offset == 1000


def test_a_whole_digest_mismatch_discards_the_upload(store: ArtifactStore, payload: bytes) -> None:
    promised = digest_of(b"something else" * 100)
    state = store.start_upload(BUNDLE, len(payload), promised, "acme")
    send(store, state.upload_id, "acme", payload)
    with pytest.raises(DigestMismatchError, match="discarded"):
        store.finish(state.upload_id, "acme")
    assert promised not in store and digest_of(payload) not in store
    assert files_under(store.root) == set()
    with pytest.raises(UnknownUploadError):
        store.upload_state(state.upload_id, "acme")


def test_owners_see_only_their_own_uploads(store: ArtifactStore, payload: bytes) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    chunk = payload[:CHUNK]
    with pytest.raises(UploadPermissionError):
        store.upload_state(state.upload_id, "globex")
    with pytest.raises(UploadPermissionError):
        store.append(state.upload_id, "globex", 0, chunk, sha(chunk))
    with pytest.raises(UploadPermissionError):
        store.finish(state.upload_id, "globex")
    assert store.upload_state(state.upload_id, None).offset == 0  # the operator sees all
    with pytest.raises(UnknownUploadError):
        store.upload_state("0" * 32, "acme")
    with pytest.raises(UnknownArtifactError):
        store.info(digest_of(b"never stored"))


def test_a_known_digest_with_another_kind_or_size_is_refused(
    store: ArtifactStore, payload: bytes
) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    with pytest.raises(InvalidInputError, match="known as"):
        store.start_upload(BUNDLE, len(payload) + 1, digest_of(payload), "acme")
    send(store, state.upload_id, "acme", payload)
    store.finish(state.upload_id, "acme")
    with pytest.raises(InvalidInputError, match="known as"):
        store.start_upload(ArtifactKind.MODEL, len(payload), digest_of(payload), "acme")


def test_recovery_removes_crash_leftovers_and_keeps_unfinished_uploads(
    store: ArtifactStore, payload: bytes
) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    send(store, state.upload_id, "acme", payload[:3000])
    leftovers = [
        store.blobs / ".tmp-0123abcd",  # put_file interrupted
        store.uploads / ".tmp-89ab-0011.json",  # an upload record being written
        store.uploads / ("f" * 32 + ".part"),  # a part without its record
        store.blobs / ("e" * 64 + ".json"),  # metadata whose blob never arrived
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    restarted = ArtifactStore(store.root, max_artifact_bytes=100_000, max_chunk_bytes=CHUNK)
    assert sorted(restarted.recover()) == sorted(leftovers)
    assert files_under(store.root) == {f"uploads/{state.upload_id}.{e}" for e in ("json", "part")}
    assert "sha256:" + "e" * 64 not in restarted
    # The partial upload resumes from the length of its .part file.
    resumed = restarted.upload_state(state.upload_id, "acme")
    assert resumed.offset == 3000
    send(restarted, state.upload_id, "acme", payload, start=3000)
    assert restarted.finish(state.upload_id, "acme").size == len(payload)


def test_recovery_prunes_old_finished_upload_records(store: ArtifactStore, payload: bytes) -> None:
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    send(store, state.upload_id, "acme", payload)
    store.finish(state.upload_id, "acme")
    assert store.recover() == []  # recent: still answers a repeated FinishUpload
    removed = store.recover(keep_finished=dt.timedelta(seconds=-1))
    assert removed == [store.uploads / f"{state.upload_id}.json"]
    assert digest_of(payload) in store


def test_recovery_abandons_uploads_idle_for_too_long(store: ArtifactStore, payload: bytes) -> None:
    idle = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    send(store, idle.upload_id, "acme", payload[:3000])
    other = payload[::-1]
    recent = store.start_upload(BUNDLE, len(other), digest_of(other), "acme")
    send(store, recent.upload_id, "acme", other[:1000])
    week_ago = (dt.datetime.now(dt.UTC) - dt.timedelta(days=8)).timestamp()
    os.utime(store.uploads / f"{idle.upload_id}.part", (week_ago, week_ago))
    removed = store.recover()
    assert sorted(removed) == sorted(
        store.uploads / f"{idle.upload_id}.{e}" for e in ("json", "part")
    )
    with pytest.raises(InvalidInputError):
        store.upload_state(idle.upload_id, "acme")
    assert store.upload_state(recent.upload_id, "acme").offset == 1000  # still resumable
    again = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    assert again.offset == 0  # the owner starts over


def test_two_owners_upload_the_same_digest_concurrently(
    store: ArtifactStore, payload: bytes
) -> None:
    errors: list[BaseException] = []
    infos = []
    barrier = threading.Barrier(2)

    def upload(owner: str) -> None:
        try:
            state = store.start_upload(BUNDLE, len(payload), digest_of(payload), owner)
            barrier.wait(timeout=10)  # both uploads exist before either sends a byte
            # The other owner may finish first: then nothing is left to send.
            with contextlib.suppress(UploadCompleteError):
                send(store, state.upload_id, owner, payload, start=state.offset)
            infos.append(store.finish(state.upload_id, owner))
        except BaseException as err:  # reported by the assert below
            errors.append(err)

    threads = [threading.Thread(target=upload, args=(o,)) for o in ("acme", "globex")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(infos) == 2 and len(set(infos)) == 1
    assert files_under(store.blobs) == {infos[0].digest[7:], infos[0].digest[7:] + ".json"}
    assert not list(store.uploads.glob("*.part"))


def test_server_side_additions_are_atomic_and_content_addressed(
    store: ArtifactStore, tmp_path: Path
) -> None:
    src = tmp_path / "anchor"
    src.mkdir()
    (src / "config.json").write_text("{}")
    packed = pack_directory(src, tmp_path / "anchor.tar")
    from_dir = store.put_directory(src, ArtifactKind.ANCHOR)
    from_file = store.put_file(packed.path, ArtifactKind.ANCHOR)
    assert from_dir == from_file
    assert (from_dir.digest, from_dir.size) == (packed.digest, packed.size)
    assert files_under(store.blobs) == {from_dir.digest[7:], from_dir.digest[7:] + ".json"}


def test_racing_appends_to_one_upload_never_corrupt_it(
    store: ArtifactStore, payload: bytes
) -> None:
    """Two streams of one upload (a client retrying while its old stream lives on): every
    chunk lands once, the loser of each race is told the offset, and the result verifies."""
    state = store.start_upload(BUNDLE, len(payload), digest_of(payload), "acme")
    refused: list[int] = []

    def stream() -> None:
        while True:
            offset = store.upload_state(state.upload_id, "acme").offset
            if offset == len(payload):
                return
            chunk = payload[offset : offset + CHUNK]
            try:
                store.append(state.upload_id, "acme", offset, chunk, sha(chunk))
            except OffsetMismatchError as err:
                refused.append(err.expected)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.finish(state.upload_id, "acme").digest == digest_of(payload)
