"""Admission: members holding idle or slow transfer streams cannot starve anybody else.

A real ``flexfed coordinator serve`` subprocess with the default limits (16 workers, 4 of them
kept for the short calls, 2 transfer streams per member), except a 60 s idle watchdog so
that nothing is freed by it during the test. Eight members open two streams each: five
owners hold Upload streams that sent one chunk and went silent, three auditors hold Download
streams of a 16 MiB artifact that read one chunk and stopped reading.

Protects (issue 12, "one member can freeze the coordinator"): a member's third stream is
refused at once, ``RESOURCE_EXHAUSTED`` "busy: ..."; past the twelve transfer streams the
server admits, further streams are refused at once the same way; while all of that is held,
another member's registry and audit calls and the health check each answer within 2 s; a
stream that ends frees its slot for the next. (Before the bound, the 16 streams held all 16
workers and the health check timed out; a member could hold every worker by itself.)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from consortium import Consortium, Member, served_coordinator
from grpc_health.v1 import health_pb2, health_pb2_grpc
from integration.test_load import CHUNK, Stalled

from flexfed.common.api.transfer import upload_artifact
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.archive import ArtifactKind
from flexfed.proto.v1 import (
    artifact_pb2,
    artifact_pb2_grpc,
    audit_pb2,
    audit_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ORIGIN = "admission.example/log"
ANSWER_WITHIN = 2.0  # seconds
BOUND = 3_485_840  # the largest valid expert bundle for the small anchor, in bytes


@pytest.fixture
def served(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> Iterator[tuple[Path, str]]:
    limits = {"stream_idle_seconds": 60.0}
    with served_coordinator(consortium, small_anchor.path, tmp_path, ORIGIN, limits) as served:
        yield served


def _admitted_upload(consortium: Consortium, address: str, member: Member) -> Stalled:
    """An Upload stream that the server admitted: its one chunk is durable, then silence."""
    stream = Stalled(consortium.channel(address, member), chunks=1)
    deadline = time.monotonic() + 20
    while stream.offset() < CHUNK:
        assert not stream.call.done(), f"{member.org}'s stream ended: {stream.call.exception()}"
        assert time.monotonic() < deadline, f"{member.org}'s chunk never arrived"
        time.sleep(0.02)
    return stream


class SlowReader:
    """A Download stream that reads its first chunk and then nothing."""

    def __init__(self, channel: grpc.Channel, digest: str) -> None:
        stub = artifact_pb2_grpc.ArtifactServiceStub(channel)
        self.call = stub.Download(artifact_pb2.DownloadRequest(digest=digest), timeout=600)
        self.first = next(self.call)  # raises the refusal, if any


def _refused_at_once(open_stream: object) -> str:
    """Call ``open_stream``; it must fail with RESOURCE_EXHAUSTED within ANSWER_WITHIN s."""
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        assert callable(open_stream)
        open_stream()
    assert time.monotonic() - began < ANSWER_WITHIN
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
    return str(caught.value.details())


def test_held_streams_starve_nobody(
    consortium: Consortium, served: tuple[Path, str], tmp_path: Path
) -> None:
    root, address = served
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 << 20))
    operator = consortium.channel(address, consortium.operator)
    # An anchor-kind artifact: every member may read one (flexfed.server.access).
    stored = upload_artifact(operator, big, ArtifactKind.ANCHOR, progress=False)
    assert stored.digest == "sha256:" + hashlib.sha256(big.read_bytes()).hexdigest()

    owners = [consortium.pki.member(f"holder-{i}") for i in range(5)]
    auditors = [consortium.pki.member(f"reader-{i}", "auditor") for i in range(3)]
    uploads: list[Stalled] = []
    readers: list[SlowReader] = []
    try:
        for member in owners:
            uploads += [_admitted_upload(consortium, address, member) for _ in range(2)]
        # A member's third stream: refused at once, whatever is free in all.
        third = Stalled(consortium.channel(address, owners[0]), chunks=1)
        details = _refused_at_once(lambda: third.call.result(timeout=30))
        assert details.startswith("busy: holder-0 already has 2 transfer stream(s) open"), details

        for _ in range(2):  # 10 + 2: every transfer stream the server admits
            readers.append(SlowReader(consortium.channel(address, auditors[0]), stored.digest))
        assert len(readers[0].first.data) == 1 << 20 and readers[0].first.offset == 0
        for auditor in auditors[1:]:  # within their own limit, but none is free in all
            channel = consortium.channel(address, auditor)
            details = _refused_at_once(lambda c=channel: SlowReader(c, stored.digest))
            assert details.startswith("busy: the coordinator is serving its most transfer"), details

        # Everybody else's short calls, and the health check, still answer at once.
        other = consortium.channel(address, consortium.globex)
        calls = {
            "health": lambda: health_pb2_grpc.HealthStub(other).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=ANSWER_WITHIN
            ),
            "anchor": lambda: registry_pb2_grpc.RegistryServiceStub(other).GetAnchor(
                registry_pb2.GetAnchorRequest(), timeout=ANSWER_WITHIN
            ),
            "experts": lambda: registry_pb2_grpc.RegistryServiceStub(other).ListExperts(
                registry_pb2.ListExpertsRequest(), timeout=ANSWER_WITHIN
            ),
            "checkpoint": lambda: audit_pb2_grpc.AuditServiceStub(other).GetCheckpoint(
                audit_pb2.GetCheckpointRequest(), timeout=ANSWER_WITHIN
            ),
        }
        for name, call in calls.items():
            began = time.monotonic()
            answer = call()
            took = time.monotonic() - began
            assert took < ANSWER_WITHIN, f"{name} took {took:.2f} s"
            if name == "health":
                assert answer.status == health_pb2.HealthCheckResponse.SERVING

        # A stream that ends frees its slot: holder-0 may open one again.
        uploads.pop(0).end()
        deadline = time.monotonic() + 10
        while True:
            try:
                uploads.append(_admitted_upload(consortium, address, owners[0]))
                break
            except (AssertionError, grpc.RpcError):
                assert time.monotonic() < deadline, "the ended stream's slot was never freed"
                time.sleep(0.1)
    finally:
        for stream in uploads:
            stream.end()
        for reader in readers:
            reader.call.cancel()
    assert (root / "coordinator.toml").read_text().count("streams_per_member = 2") == 1


def test_an_owner_upload_larger_than_any_valid_bundle_is_refused_before_a_byte(
    consortium: Consortium, served: tuple[Path, str]
) -> None:
    """The issue's 64 MiB "bundle" for an anchor whose bundles are far smaller: refused at
    StartUpload (the store's limit is 64 GiB), so nothing is stored; a bundle-sized upload is
    admitted."""
    root, address = served
    acme = artifact_pb2_grpc.ArtifactServiceStub(consortium.channel(address, consortium.acme))
    digest = "sha256:" + "ab" * 32

    def start(size: int) -> artifact_pb2.UploadState:
        request = artifact_pb2.StartUploadRequest(
            kind=artifact_pb2.ARTIFACT_KIND_EXPERT_BUNDLE, size=size, digest=digest
        )
        return acme.StartUpload(request, timeout=10)

    details = _refused_at_once(lambda: start(64 << 20))
    # The small olmo2 anchor's experts: 2 layers x (3 FFN matrices of 16 x 32, a router row of
    # 16, a bias) in F32 = 12,424 bytes, + 8 + 1 MiB of header room, + 256 KiB of expert.json,
    # + 2 x 1 MiB of attestations, + 64 KiB of tar headers.
    assert details == (
        f"an expert bundle for this anchor is at most {BOUND} bytes; "
        f"{64 << 20} bytes cannot be a valid one"
    ), details
    assert list((root / "store" / "uploads").iterdir()) == []
    assert start(BOUND).upload_id  # the largest a bundle can be is admitted


def test_unfinished_uploads_are_bounded_per_member_and_can_be_cancelled(
    consortium: Consortium, served: tuple[Path, str]
) -> None:
    """Issue 12: no bound on a member's unfinished uploads, and no call to cancel one."""
    root, address = served
    acme = artifact_pb2_grpc.ArtifactServiceStub(consortium.channel(address, consortium.acme))
    globex = artifact_pb2_grpc.ArtifactServiceStub(consortium.channel(address, consortium.globex))

    def start(stub: artifact_pb2_grpc.ArtifactServiceStub, i: int) -> artifact_pb2.UploadState:
        request = artifact_pb2.StartUploadRequest(
            kind=artifact_pb2.ARTIFACT_KIND_EXPERT_BUNDLE,
            size=1000,
            digest="sha256:" + hashlib.sha256(b"%d" % i).hexdigest(),
        )
        return stub.StartUpload(request, timeout=10)

    held = [start(acme, i) for i in range(4)]  # limits.uploads_per_member = 4 by default
    details = _refused_at_once(lambda: start(acme, 4))
    assert details == (
        "acme already holds 4 unfinished upload(s), the most one member may "
        "(limits.uploads_per_member); finish or cancel one first"
    )
    assert start(acme, 0).upload_id == held[0].upload_id  # resuming is always allowed
    assert start(globex, 4).upload_id  # another member's quota is its own

    cancel = artifact_pb2.CancelUploadRequest(upload_id=held[0].upload_id)
    with pytest.raises(grpc.RpcError) as foreign:
        globex.CancelUpload(cancel, timeout=10)
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED
    acme.CancelUpload(cancel, timeout=10)
    uploads = root / "store" / "uploads"
    assert not list(uploads.glob(f"{held[0].upload_id}.*"))  # record and bytes gone
    with pytest.raises(grpc.RpcError) as gone:
        acme.GetUpload(artifact_pb2.GetUploadRequest(upload_id=held[0].upload_id), timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    assert start(acme, 5).upload_id  # the cancelled one's place is free
