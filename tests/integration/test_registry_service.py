"""The registry and audit services through a real mTLS server on 127.0.0.1.

Protects: an owner's upload (ArtifactService) and submission is accepted with an inclusion
proof that verifies against the signed checkpoint; every bad bundle of the validation
catalogue and every tamper case of the signing catalogue is refused with its reason code and
changes nothing; owners act only for their own org (PERMISSION_DENIED otherwise), auditors
never submit; opt-out and opt-in must be signed by the owning org, fresh and not replayed;
revocation and release are the operator's, and a release downloads and passes the auditor's
full audit against the coordinator's log; the audit service's proofs verify offline.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from conftest import make_expert_bundle
from consortium import Consortium, Member

from flexfed.client.sign import sign_bundle
from flexfed.common.api.transfer import download_artifact, upload_artifact
from flexfed.common.errors import (
    AnchorMismatchError,
    BundleError,
    FlexfedError,
    MetadataError,
    MissingFileError,
    NonFiniteTensorError,
    SafetensorsFormatError,
    TensorMismatchError,
)
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.archive import ArtifactKind
from flexfed.common.formats.bundle import validate_bundle
from flexfed.common.translog.checkpoint import SignedCheckpoint, load_public_key, verify_checkpoint
from flexfed.common.translog.merkle import leaf_hash, verify_consistency, verify_inclusion
from flexfed.common.trust.audit import audit_model
from flexfed.common.trust.ca import revoke
from flexfed.common.trust.log_events import parse_entry
from flexfed.common.trust.owner_request import sign_owner_request
from flexfed.common.trust.signing import BundleVerifier
from flexfed.proto.v1 import audit_pb2, audit_pb2_grpc, registry_pb2, registry_pb2_grpc
from flexfed.server.app import build_server
from flexfed.server.coordinator import Coordinator, init_coordinator
from flexfed.server.pipeline import reason_code

pytestmark = pytest.mark.integration
TESTS = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _catalogue(path: str) -> ModuleType:
    """A unit test module's catalogue (tests/unit is not a package)."""
    return _load(f"_catalogue_{Path(path).stem}", TESTS / "unit" / path)


BAD = _catalogue("common/formats/test_bad_bundles.py")
TAMPER = _catalogue("common/trust/test_signing.py")
BAD_CODES = {
    MissingFileError: "bundle-invalid",
    BundleError: "bundle-invalid",
    MetadataError: "metadata-invalid",
    AnchorMismatchError: "anchor-mismatch",
    SafetensorsFormatError: "safetensors-invalid",
    TensorMismatchError: "shape-mismatch",
    NonFiniteTensorError: "not-finite",
}
# Literal: what the coordinator must answer for each tamper case (never its own reason_code).
TAMPER_CODES = {
    "weights byte flipped": "signature-invalid",
    "expert.json byte flipped": "metadata-invalid",  # validation reads it before the signature
    "provenance payload byte flipped": "provenance-invalid",
    "provenance file byte flipped": "provenance-invalid",
    "signed manifest rewritten": "signature-invalid",
    "model.sig garbage": "signature-invalid",
    "model.sig missing": "signature-invalid",
    "provenance missing": "provenance-invalid",
    "unsigned extra file": "bundle-invalid",
    "another org's certificate": "org-mismatch",
    "certificate not yet valid": "certificate-untrusted",
    "revoked certificate": "certificate-revoked",
    "certificate from another CA": "certificate-untrusted",
    "provenance for other weights": "provenance-invalid",
    "provenance by another key": "provenance-invalid",
    "provenance names another data commitment": "provenance-invalid",
    "provenance names another builder": "provenance-invalid",
    "auditor certificate signs": "certificate-untrusted",
    "signature covers only the weights": "signature-invalid",
}


@pytest.fixture(scope="module")
def coordinator(
    consortium: Consortium, small_anchor: Anchor, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Coordinator]:
    root = tmp_path_factory.mktemp("coordinator") / "coord"
    init_coordinator(
        root,
        ca_cert=consortium.pki.ca_pem,
        crl=consortium.pki.crl_pem,
        tls_cert=consortium.server.cert,
        tls_key=consortium.server.key,
        anchor_dir=small_anchor.path,
        origin="test.example/log",
    )
    with Coordinator.open(root) as c:
        yield c


@pytest.fixture(scope="module")
def address(coordinator: Coordinator) -> Iterator[str]:
    built = build_server(coordinator, listen="127.0.0.1:0")
    built.start()
    yield built.address
    built.stop(grace=None)


class Client:
    """A member's stubs."""

    def __init__(self, consortium: Consortium, address: str, member: Member) -> None:
        self.member = member
        self.channel = consortium.channel(address, member)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.audit = audit_pb2_grpc.AuditServiceStub(self.channel)

    def submit(self, digest: str) -> registry_pb2.SubmitExpertResponse:
        return self.registry.SubmitExpert(
            registry_pb2.SubmitExpertRequest(artifact_digest=digest), timeout=30
        )

    def owner_request(self, action: str, expert_id: str, org: str, signer: Member, **kw):
        request = sign_owner_request(action, expert_id, org, signer.key, signer.cert, **kw)
        method = self.registry.OptOut if action == "opt-out" else self.registry.OptIn
        return method(request.to_proto(), timeout=10)


@pytest.fixture(scope="module")
def clients(consortium: Consortium, address: str) -> dict[str, Client]:
    return {
        name: Client(consortium, address, getattr(consortium, name))
        for name in ("acme", "globex", "auditor", "operator")
    }


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def accepted_bundle(
    coordinator: Coordinator,
    small_anchor: Anchor,
    consortium: Consortium,
    client: Client,
    where: Path,
    name: str,
    seed: int,
) -> str:
    member = client.member
    bundle = make_expert_bundle(small_anchor, where / name, member.org, seed, name)
    sign_bundle(bundle, member.key, member.cert, [consortium.pki.ca_pem])
    digest = coordinator.store.put_directory(bundle, ArtifactKind.EXPERT_BUNDLE).digest
    answer = client.submit(digest)
    assert answer.accepted, answer.reason
    return digest


def snapshot(coordinator: Coordinator) -> tuple[int, int]:
    return coordinator.log.size, len(coordinator.registry.experts())


# --- submission ----------------------------------------------------------------------------


def test_an_uploaded_bundle_is_accepted_with_a_verifiable_inclusion_proof(
    consortium: Consortium,
    coordinator: Coordinator,
    clients: dict[str, Client],
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    acme = clients["acme"]
    anchor = acme.registry.GetAnchor(registry_pb2.GetAnchorRequest(), timeout=10)
    assert anchor.digest == small_anchor.digest == coordinator.config.anchor.digest
    bundle = make_expert_bundle(small_anchor, tmp_path / "code", "acme", 11, "code")
    sign_bundle(bundle, consortium.acme.key, consortium.acme.cert, [consortium.pki.ca_pem])
    info = upload_artifact(acme.channel, bundle, ArtifactKind.EXPERT_BUNDLE, progress=False)
    answer = acme.submit(info.digest)
    assert answer.accepted, answer.reason
    assert answer.expert.expert_id == info.digest and answer.expert.org == "acme"
    assert answer.expert.state == registry_pb2.EXPERT_STATE_ACCEPTED

    key = acme.audit.GetLogKey(audit_pb2.GetLogKeyRequest(), timeout=10)
    assert key.public_key_pem == coordinator.config.log_public_key.read_bytes()
    checkpoint = verify_checkpoint(
        SignedCheckpoint.from_text(answer.checkpoint.text),
        load_public_key(key.public_key_pem),
        origin="test.example/log",
    )
    entry = acme.audit.GetEntries(
        audit_pb2.GetEntriesRequest(start=answer.expert.log_index, end=answer.expert.log_index + 1),
        timeout=10,
    ).entries[0]
    assert parse_entry(entry)["expert_id"] == info.digest
    assert answer.inclusion.tree_size == checkpoint.tree_size
    verify_inclusion(
        leaf_hash(entry),
        answer.inclusion.leaf_index,
        answer.inclusion.tree_size,
        list(answer.inclusion.hashes),
        checkpoint.root_hash,
    )
    again = acme.submit(info.digest)
    assert again.accepted and again.expert == answer.expert
    got = clients["auditor"].registry.GetExpert(
        registry_pb2.GetExpertRequest(expert_id=info.digest), timeout=10
    )
    assert got == answer.expert
    listed = acme.registry.ListExperts(registry_pb2.ListExpertsRequest(org="acme"), timeout=10)
    assert info.digest in [e.expert_id for e in listed.experts]


@pytest.mark.parametrize("case", BAD.CASES, ids=[c.id for c in BAD.CASES])
def test_every_bad_bundle_is_refused_with_its_code(
    case,
    consortium: Consortium,
    coordinator: Coordinator,
    clients: dict[str, Client],
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    # Signed, then broken: validation comes first, so the defect is found, not the signature.
    # (A few defects are written where a signature would be: those start unsigned.)
    bad = make_expert_bundle(small_anchor, tmp_path / "bundle", "acme", 12)
    sign_bundle(bad, consortium.acme.key, consortium.acme.cert, [consortium.pki.ca_pem])
    try:
        case.corrupt(bad, small_anchor)
    except OSError:
        shutil.rmtree(bad)
        bad = make_expert_bundle(small_anchor, tmp_path / "bundle", "acme", 12)
        case.corrupt(bad, small_anchor)
    try:
        digest = coordinator.store.put_directory(bad, ArtifactKind.EXPERT_BUNDLE).digest
    except FlexfedError as err:  # a link, or no directory at all: no artifact can hold it
        assert str(err).endswith(
            ("is a symbolic link; artifacts hold regular files only", "/bundle is not a directory")
        ), err
        return
    before = snapshot(coordinator)
    answer = clients["acme"].submit(digest)
    assert not answer.accepted
    assert answer.reason_code == BAD_CODES[case.error], answer.reason
    assert answer.reason and "\n" not in answer.reason
    assert snapshot(coordinator) == before


@pytest.mark.parametrize("case", list(TAMPER.TAMPER_CASES))
def test_every_tampered_bundle_is_refused_with_its_code(
    case: str,
    consortium: Consortium,
    coordinator: Coordinator,
    clients: dict[str, Client],
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    pki = consortium.pki
    alice = pki.member("alice", name=f"alice-{abs(hash(case))}")
    bundle = make_expert_bundle(small_anchor, tmp_path / "expert", "alice", seed=13)
    sign_bundle(bundle, alice.key, alice.cert, [pki.ca_pem])
    tamper, _ = TAMPER.TAMPER_CASES[case]
    if tamper(TAMPER.Case(pki, alice, bundle, small_anchor)):
        pytest.skip("needs a verification time or anchor other than the coordinator's")
    expected = TAMPER_CODES[case]
    try:
        validate_bundle(bundle, small_anchor)
        BundleVerifier(pki.ca_pem, pki.crl_pem, small_anchor.digest).verify(bundle)
    except FlexfedError as err:
        assert reason_code(err) == expected  # the local checks agree with the coordinator
    else:
        pytest.fail(f"{case} is not refused locally either")
    digest = coordinator.store.put_directory(bundle, ArtifactKind.EXPERT_BUNDLE).digest
    before = snapshot(coordinator)
    answer = clients["operator"].submit(digest)  # the operator may submit for alice
    assert (answer.accepted, answer.reason_code) == (False, expected), answer.reason
    assert snapshot(coordinator) == before


def test_owners_submit_only_for_their_org_and_auditors_never(
    consortium: Consortium,
    coordinator: Coordinator,
    clients: dict[str, Client],
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    bundle = make_expert_bundle(small_anchor, tmp_path / "b", "acme", 14, "legal")
    sign_bundle(bundle, consortium.acme.key, consortium.acme.cert, [consortium.pki.ca_pem])
    digest = coordinator.store.put_directory(bundle, ArtifactKind.EXPERT_BUNDLE).digest
    before = snapshot(coordinator)
    assert code_of(lambda: clients["globex"].submit(digest)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: clients["auditor"].submit(digest)) == grpc.StatusCode.PERMISSION_DENIED
    assert snapshot(coordinator) == before


def test_a_bundle_signed_with_a_revoked_certificate_is_refused(
    consortium: Consortium,
    coordinator: Coordinator,
    clients: dict[str, Client],
    small_anchor: Anchor,
    tmp_path: Path,
    address: str,
) -> None:
    leaving = consortium.pki.member("acme", name="acme-leaving")
    bundle = make_expert_bundle(small_anchor, tmp_path / "b", "acme", 15, "leaving")
    sign_bundle(bundle, leaving.key, leaving.cert, [consortium.pki.ca_pem])
    digest = coordinator.store.put_directory(bundle, ArtifactKind.EXPERT_BUNDLE).digest
    revoke(consortium.pki.ca_dir, leaving.cert, "key-compromise")
    answer = clients["acme"].submit(digest)
    assert (answer.accepted, answer.reason_code) == (False, "certificate-revoked")
    own = Client(consortium, address, leaving)  # and the revoked certificate cannot call
    assert code_of(lambda: own.submit(digest)) == grpc.StatusCode.PERMISSION_DENIED


# --- opt-out, opt-in, revocation, release --------------------------------------------------


def test_opt_out_and_in_are_signed_by_the_owning_org(
    consortium: Consortium,
    coordinator: Coordinator,
    clients: dict[str, Client],
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    acme, globex = clients["acme"], clients["globex"]
    expert_id = accepted_bundle(coordinator, small_anchor, consortium, acme, tmp_path, "math", 16)
    denied = grpc.StatusCode.PERMISSION_DENIED
    # globex, for acme's expert, with its own signature or claiming to be acme:
    assert (
        code_of(lambda: globex.owner_request("opt-out", expert_id, "globex", consortium.globex))
        == denied
    )
    assert (
        code_of(lambda: acme.owner_request("opt-out", expert_id, "acme", consortium.globex))
        == denied
    )
    stale = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=11)
    assert (
        code_of(
            lambda: acme.owner_request("opt-out", expert_id, "acme", consortium.acme, time=stale)
        )
        == denied
    )
    size = coordinator.log.size
    noop = acme.owner_request("opt-in", expert_id, "acme", consortium.acme)  # already in
    assert noop.expert.state == registry_pb2.EXPERT_STATE_ACCEPTED
    assert coordinator.log.size == size
    assert coordinator.registry.require_expert(expert_id).state.value == "accepted"

    out_request = sign_owner_request(
        "opt-out", expert_id, "acme", consortium.acme.key, consortium.acme.cert
    )
    out = acme.registry.OptOut(out_request.to_proto(), timeout=10)
    assert out.expert.state == registry_pb2.EXPERT_STATE_OPTED_OUT
    event = parse_entry(coordinator.log.entry(out.log_index))
    assert event["type"] == "opt-out" and event["expert_id"] == expert_id
    assert event["statement"].encode() == out_request.statement
    again = acme.registry.OptOut(out_request.to_proto(), timeout=10)  # idempotent
    assert again.log_index == out.log_index
    back = acme.owner_request("opt-in", expert_id, "acme", consortium.acme)
    assert back.expert.state == registry_pb2.EXPERT_STATE_ACCEPTED
    assert (
        code_of(  # the old opt-out, replayed
            lambda: acme.registry.OptOut(out_request.to_proto(), timeout=10)
        )
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    assert coordinator.registry.require_expert(expert_id).state.value == "accepted"


def test_revocation_and_release_are_the_operators_and_a_release_passes_the_audit(
    consortium: Consortium,
    coordinator: Coordinator,
    clients: dict[str, Client],
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    acme, operator = clients["acme"], clients["operator"]
    keep = accepted_bundle(
        coordinator, small_anchor, consortium, clients["globex"], tmp_path, "g", 17
    )
    drop = accepted_bundle(coordinator, small_anchor, consortium, acme, tmp_path, "bad", 18)
    revoke_request = registry_pb2.RevokeExpertRequest(expert_id=drop, reason="poisoned")
    assert (
        code_of(lambda: acme.registry.RevokeExpert(revoke_request, timeout=10))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    revoked = operator.registry.RevokeExpert(revoke_request, timeout=10)
    assert revoked.expert.state == registry_pb2.EXPERT_STATE_REVOKED
    assert parse_entry(coordinator.log.entry(revoked.log_index))["type"] == "revocation"
    assert (
        code_of(lambda: acme.owner_request("opt-out", drop, "acme", consortium.acme))
        == grpc.StatusCode.FAILED_PRECONDITION
    )

    request = registry_pb2.ReleaseRequest(expert_ids=[keep], top_k=2)
    assert (
        code_of(lambda: acme.registry.ReleaseModel(request, timeout=60))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    refused = registry_pb2.ReleaseRequest(expert_ids=[drop])
    assert (
        code_of(lambda: operator.registry.ReleaseModel(refused, timeout=60))
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    release = operator.registry.ReleaseModel(request, timeout=60)
    assert list(release.expert_ids) == [keep] and release.top_k == 2
    listed = clients["auditor"].registry.ListReleases(
        registry_pb2.ListReleasesRequest(), timeout=10
    )
    assert release in listed.releases

    model = download_artifact(
        clients["auditor"].channel, release.model_artifact_digest, tmp_path / "model",
        progress=False,
    )  # fmt: skip
    report = audit_model(
        model,
        consortium.pki.ca_pem,
        consortium.pki.crl_pem,
        coordinator.config.log_file,
        coordinator.config.log_public_key,
        anchor=small_anchor,
        log_origin="test.example/log",
    )
    assert report.ok, report.summary()


# --- the audit service ---------------------------------------------------------------------


def test_audit_service_proofs_verify_offline(
    coordinator: Coordinator,
    clients: dict[str, Client],
    consortium: Consortium,
    small_anchor: Anchor,
    tmp_path: Path,
) -> None:
    audit = clients["auditor"].audit
    key = load_public_key(audit.GetLogKey(audit_pb2.GetLogKeyRequest(), timeout=10).public_key_pem)

    def checkpoint():
        text = audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=10).text
        return verify_checkpoint(SignedCheckpoint.from_text(text), key)

    accepted_bundle(coordinator, small_anchor, consortium, clients["acme"], tmp_path, "a1", 19)
    old = checkpoint()
    accepted_bundle(coordinator, small_anchor, consortium, clients["acme"], tmp_path, "a2", 20)
    new = checkpoint()
    assert new.tree_size == old.tree_size + 1
    proof = audit.GetConsistencyProof(
        audit_pb2.GetConsistencyProofRequest(old_size=old.tree_size), timeout=10
    )
    assert proof.new_size == new.tree_size
    verify_consistency(
        old.tree_size, new.tree_size, old.root_hash, new.root_hash, list(proof.hashes)
    )

    page = audit.GetEntries(audit_pb2.GetEntriesRequest(start=0, end=10**6), timeout=10)
    assert page.start == 0 and len(page.entries) == new.tree_size
    for index in (0, new.tree_size - 1):
        inclusion = audit.GetInclusionProof(
            audit_pb2.GetInclusionProofRequest(leaf_index=index, tree_size=new.tree_size),
            timeout=10,
        )
        verify_inclusion(
            leaf_hash(page.entries[index]), index, new.tree_size, list(inclusion.hashes),
            new.root_hash,
        )  # fmt: skip
    out_of_range = audit_pb2.GetInclusionProofRequest(leaf_index=10**6)
    assert (
        code_of(lambda: audit.GetInclusionProof(out_of_range, timeout=10))
        == grpc.StatusCode.OUT_OF_RANGE
    )
    assert (
        code_of(lambda: audit.GetEntries(audit_pb2.GetEntriesRequest(start=5, end=5), timeout=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
