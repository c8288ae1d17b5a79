"""Load: eight owners upload and submit at once to one served coordinator, past stalled streams.

A real ``flexfed coordinator serve`` subprocess; eight organisations certified by the
consortium CA, each with its own mutual-TLS channel in its own thread, upload and submit a
signed tiny expert at the same moment (``flexfed.common.api.consortium.ConsortiumClient``, which
also checks each acceptance's inclusion proof). Before they start, stalled clients hold every
transfer stream the server admits with Upload streams of a 10-minute deadline: eleven that
never send a chunk and one that sends one and goes silent (one member may hold them all
here; by default it may hold two, see test_admission.py).

Protects: all eight are accepted, at distinct log indexes, one entry each; every checkpoint
an owner saw right after its acceptance is consistent with the final signed checkpoint (the
log only grew), and each acceptance is included in the final tree, all verified with the
log key from the coordinator directory (not the server's word); ``flexfed coordinator check``
passes while serving; the stalled streams are cancelled by the server after
``limits.stream_idle_seconds`` (whatever their deadline), so they delay the others by that
much and block nobody (the owners' uploads are refused "busy" and retried); the silent
one's chunk stays durable for its resume. (Before that limit existed, as many stalled streams
as workers froze every call until their deadline.)
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from conftest import make_expert_bundle
from consortium import Consortium, Member, served_coordinator

from flexfed.client.sign import sign_bundle
from flexfed.common.api.consortium import Connection, ConsortiumClient
from flexfed.common.cli import cli
from flexfed.common.formats.anchor import Anchor
from flexfed.common.translog.checkpoint import SignedCheckpoint, load_public_key, verify_checkpoint
from flexfed.common.translog.merkle import leaf_hash, verify_consistency, verify_inclusion
from flexfed.common.trust.log_events import parse_entry
from flexfed.proto.v1 import artifact_pb2, artifact_pb2_grpc, audit_pb2, audit_pb2_grpc
from flexfed.server.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FLEXFED = Path(sys.executable).parent / "flexfed"
ORIGIN = "load.example/log"
OWNERS = 8
CHUNK = 16 * 1024
WORKERS = 16  # the default limits.workers
STREAMS = 12  # the transfer streams they serve at once: workers - reserved_workers (4)
IDLE = 3.0  # limits.stream_idle_seconds for this test


@pytest.fixture
def served(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> Iterator[tuple[Path, str]]:
    """A coordinator directory and the address of its ``serve`` subprocess.

    One member may hold every transfer stream here (as many as the default workers leave
    to transfers) and as many unfinished uploads, so the stalled streams below fill them all."""
    limits = {"stream_idle_seconds": IDLE, "streams_per_member": STREAMS, "uploads_per_member": 16}
    with served_coordinator(consortium, small_anchor.path, tmp_path, ORIGIN, limits) as served:
        assert f"workers = {WORKERS}\n" in (served[0] / "coordinator.toml").read_text()
        yield served


class Stalled:
    """An owner's Upload stream that sends ``chunks`` chunks and then nothing (deadline 10 min)."""

    def __init__(self, channel: grpc.Channel, chunks: int) -> None:
        data = os.urandom(4 * CHUNK)
        self.stub = artifact_pb2_grpc.ArtifactServiceStub(channel)
        self.state = self.stub.StartUpload(
            artifact_pb2.StartUploadRequest(
                kind=artifact_pb2.ARTIFACT_KIND_EXPERT_BUNDLE,
                size=len(data),
                digest="sha256:" + hashlib.sha256(data).hexdigest(),
            ),
            timeout=10,
        )
        self.release = threading.Event()

        def feed() -> Iterator[artifact_pb2.UploadChunk]:
            for i in range(chunks):
                piece = data[i * CHUNK : (i + 1) * CHUNK]
                yield artifact_pb2.UploadChunk(
                    upload_id=self.state.upload_id,
                    offset=i * CHUNK,
                    data=piece,
                    chunk_sha256=hashlib.sha256(piece).hexdigest(),
                )
            self.release.wait(600)

        self.call = self.stub.Upload.future(feed(), timeout=600)

    def offset(self) -> int:
        request = artifact_pb2.GetUploadRequest(upload_id=self.state.upload_id)
        return int(self.stub.GetUpload(request, timeout=10).offset)

    def end(self) -> None:
        self.call.cancel()
        self.release.set()


def test_eight_owners_submit_at_once_past_stalled_streams(
    consortium: Consortium, small_anchor: Anchor, served: tuple[Path, str], tmp_path: Path
) -> None:
    root, address = served
    config = load_config(root)
    log_key = load_public_key(config.log_public_key.read_bytes())  # pinned, from the directory
    owners: list[Member] = [consortium.pki.member(f"org-{i}") for i in range(OWNERS)]
    bundles = []
    for i, member in enumerate(owners):
        bundle = make_expert_bundle(small_anchor, tmp_path / member.org, member.org, i + 1)
        sign_bundle(bundle, member.key, member.cert, [consortium.pki.ca_pem])
        bundles.append(bundle)

    one_chunk = Stalled(consortium.channel(address, consortium.globex), chunks=1)
    deadline = time.monotonic() + 30
    while one_chunk.offset() < CHUNK:
        assert time.monotonic() < deadline, "the stalled stream's chunk never arrived"
        time.sleep(0.02)
    stalled = [one_chunk]
    stalled += [
        Stalled(consortium.channel(address, consortium.acme), chunks=0) for _ in range(STREAMS - 1)
    ]  # now every transfer stream is held
    held_from = time.monotonic()

    barrier = threading.Barrier(OWNERS)
    results: dict[int, tuple[int, str, SignedCheckpoint, float]] = {}
    errors: list[BaseException] = []

    def owner(i: int) -> None:
        member = owners[i]
        connection = Connection(address, consortium.pki.ca_pem, member.cert, member.key)
        try:
            with ConsortiumClient(connection, timeout=60) as client:
                barrier.wait(30)
                began = time.monotonic()
                submission = client.submit(bundles[i], progress=False)
                audit = audit_pb2_grpc.AuditServiceStub(client.channel)
                seen = audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=10).text
                results[i] = (
                    submission.log_index,
                    submission.expert.expert_id,
                    SignedCheckpoint.from_text(seen),
                    time.monotonic() - began,
                )
        except BaseException as err:  # reported below, with the owner
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=owner, args=(i,)) for i in range(OWNERS)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    elapsed = time.monotonic() - began
    try:
        assert not errors, errors
        assert sorted(results) == list(range(OWNERS))
        for stream in stalled:  # the server cancelled them, not their deadline
            assert stream.call.exception(timeout=30).code() == grpc.StatusCode.CANCELLED
        assert time.monotonic() - held_from < 60
        assert one_chunk.offset() == CHUNK  # what it sent still counts
    finally:
        for stream in stalled:
            stream.end()
    indexes = sorted(index for index, *_ in results.values())
    assert indexes == list(range(OWNERS))  # distinct, one entry each, nothing else logged
    slowest = max(seconds for *_, seconds in results.values())
    print(f"{OWNERS} owners done in {elapsed:.2f} s (slowest {slowest:.2f} s; idle limit {IDLE})")

    auditor = consortium.channel(address, consortium.auditor)
    audit = audit_pb2_grpc.AuditServiceStub(auditor)
    text = audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=10).text
    final = verify_checkpoint(SignedCheckpoint.from_text(text), log_key, origin=ORIGIN)
    assert final.tree_size == OWNERS
    page = audit.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=OWNERS), timeout=10)
    for i, (index, expert_id, seen, _) in results.items():
        earlier = verify_checkpoint(seen, log_key, origin=ORIGIN)
        assert index < earlier.tree_size <= final.tree_size
        if earlier.tree_size < final.tree_size:
            proof = audit.GetConsistencyProof(
                audit_pb2.GetConsistencyProofRequest(
                    old_size=earlier.tree_size, new_size=final.tree_size
                ),
                timeout=10,
            )
            verify_consistency(
                earlier.tree_size, final.tree_size, earlier.root_hash, final.root_hash,
                list(proof.hashes),
            )  # fmt: skip
        else:
            assert earlier.root_hash == final.root_hash
        entry = bytes(page.entries[index])
        event = parse_entry(entry)
        assert (event["type"], event["org"], event["expert_id"]) == (
            "expert-accepted",
            owners[i].org,
            expert_id,
        )
        inclusion = audit.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(leaf_index=index, tree_size=final.tree_size),
            timeout=10,
        )
        verify_inclusion(
            leaf_hash(entry), index, final.tree_size, list(inclusion.hashes), final.root_hash
        )

    result = CliRunner().invoke(cli, ["coordinator", "check", str(root)])
    assert result.exit_code == 0, result.output
    assert f"({OWNERS} experts, {OWNERS} entries)" in result.output
