"""Who may download what, through a real mTLS server on 127.0.0.1 (issue 12).

Before the policy, any member downloaded any accepted bundle by its digest, also after its
owner opted out, and every old release stayed downloadable by everyone. Protects: a bundle
goes to its organisation (submitted or only uploaded) and the operator, never to another
owner or an auditor; the anchor to everyone; a release to everyone while its experts are
accepted, and after one of them opts out only to auditors and the operator; each refusal is
PERMISSION_DENIED for GetArtifact and for Download alike, and names what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import make_expert_bundle
from consortium import Consortium, Member

from flexfed.client.sign import sign_bundle
from flexfed.common.api.transfer import upload_artifact
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.archive import ArtifactKind
from flexfed.common.trust.owner_request import sign_owner_request
from flexfed.proto.v1 import artifact_pb2, artifact_pb2_grpc, registry_pb2, registry_pb2_grpc
from flexfed.server.app import build_server
from flexfed.server.consistency import check
from flexfed.server.coordinator import Coordinator, init_coordinator
from flexfed.server.lifecycle import _event, owner_request, release
from flexfed.server.pipeline import SubmissionPipeline
from flexfed.server.registry import ExpertState

pytestmark = pytest.mark.integration


@pytest.fixture
def coordinator(
    consortium: Consortium, small_anchor: Anchor, tmp_path: Path
) -> Iterator[Coordinator]:
    root = tmp_path / "coord"
    init_coordinator(
        root,
        ca_cert=consortium.pki.ca_pem,
        crl=consortium.pki.crl_pem,
        tls_cert=consortium.server.cert,
        tls_key=consortium.server.key,
        anchor_dir=small_anchor.path,
        origin="access.example/log",
    )
    with Coordinator.open(root) as c:
        yield c


@pytest.fixture
def address(coordinator: Coordinator) -> Iterator[str]:
    built = build_server(coordinator, listen="127.0.0.1:0")
    built.start()
    yield built.address
    built.stop(grace=None)


def upload_bundle(
    consortium: Consortium,
    address: str,
    anchor: Anchor,
    member: Member,
    out: Path,
    seed: int,
    name: str = "expert",
) -> str:
    """Make, sign and upload (as ``member``) an expert bundle; its artifact digest."""
    bundle = make_expert_bundle(anchor, out, member.org, seed, name)
    sign_bundle(bundle, member.key, member.cert, [consortium.pki.ca_pem])
    channel = consortium.channel(address, member)
    return upload_artifact(channel, bundle, ArtifactKind.EXPERT_BUNDLE, progress=False).digest


def readable(consortium: Consortium, address: str, member: Member, digest: str) -> bool:
    """Whether ``member`` may read ``digest``: GetArtifact and Download must agree."""
    stub = artifact_pb2_grpc.ArtifactServiceStub(consortium.channel(address, member))
    outcomes = []
    for call in (
        lambda: stub.GetArtifact(artifact_pb2.GetArtifactRequest(digest=digest), timeout=10),
        lambda: next(stub.Download(artifact_pb2.DownloadRequest(digest=digest), timeout=10)),
    ):
        try:
            call()
            outcomes.append(True)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err
            outcomes.append(False)
    assert outcomes[0] == outcomes[1], outcomes
    return outcomes[0]


def test_bundles_go_to_their_owner_and_releases_while_their_experts_stay(
    consortium: Consortium,
    coordinator: Coordinator,
    address: str,
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    c = consortium
    acme_bundle = upload_bundle(c, address, small_anchor, c.acme, tmp_path / "acme", 21)
    globex_bundle = upload_bundle(c, address, small_anchor, c.globex, tmp_path / "globex", 22)
    assert SubmissionPipeline(coordinator).submit(acme_bundle, "acme").accepted
    # globex's bundle is uploaded, not submitted: still globex's alone.

    who = {"acme": c.acme, "globex": c.globex, "auditor": c.auditor, "operator": c.operator}

    def readers(digest: str) -> set[str]:
        return {name for name, m in who.items() if readable(c, address, m, digest)}

    assert readers(acme_bundle) == {"acme", "operator"}
    assert readers(globex_bundle) == {"globex", "operator"}
    assert readers(coordinator.config.anchor.artifact_digest) == set(who)

    v1 = release(coordinator).model_artifact_digest
    assert readers(v1) == set(who)
    request = sign_owner_request("opt-out", acme_bundle, "acme", c.acme.key, c.acme.cert)
    owner_request(coordinator, "opt-out", request, "acme")
    assert readers(v1) == {"auditor", "operator"}  # it holds an opted-out expert now
    assert readers(acme_bundle) == {"acme", "operator"}

    stub = artifact_pb2_grpc.ArtifactServiceStub(c.channel(address, c.globex))
    with pytest.raises(grpc.RpcError) as refused:
        stub.GetArtifact(artifact_pb2.GetArtifactRequest(digest=v1), timeout=10)
    assert refused.value.details() == (
        "release 1 holds an expert that was since opted out or revoked; fetch a newer release"
    )


def test_a_change_left_half_done_is_replayed_before_the_next_one(
    consortium: Consortium,
    coordinator: Coordinator,
    address: str,
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    """Coordinator.after_log gave up (its retry failed too): the opt-out is in the log, not
    in the registry. The next change through the service replays the log first."""
    c = consortium
    first, second = (
        upload_bundle(c, address, small_anchor, c.acme, tmp_path / f"b{s}", s, f"e{s}")
        for s in (41, 42)
    )
    assert SubmissionPipeline(coordinator).submit(first, "acme").accepted
    expert = coordinator.registry.require_expert(first)
    coordinator.log.append(_event("opt-out", expert, "2026-12-05T09:00:00+00:00"))
    coordinator.needs_recovery = True
    assert coordinator.registry.require_expert(first).state is ExpertState.ACCEPTED

    registry = registry_pb2_grpc.RegistryServiceStub(c.channel(address, c.acme))
    answer = registry.SubmitExpert(
        registry_pb2.SubmitExpertRequest(artifact_digest=second), timeout=30
    )
    assert answer.accepted
    assert coordinator.registry.require_expert(first).state is ExpertState.OPTED_OUT
    assert not coordinator.needs_recovery
    assert check(coordinator) == []
