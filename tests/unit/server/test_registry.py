"""The coordinator's control side without a server: directory, registry, submissions, recovery.

Protects: ``init`` makes a complete coordinator directory (config that loads back, log key
0600, the anchor published in the store) and never overwrites one; the registry stores and
returns experts and releases; a submission is accepted once (a second time returns the same
acceptance and logs nothing); every refusal has its stable code and changes nothing (log,
registry, staging); a crash between the log append and the registry write is repaired from
the log at startup, and ``check`` reports exactly such disagreements.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import make_expert_bundle
from consortium import Member, Pki

from flexfed.client.sign import sign_bundle
from flexfed.common.errors import ConfigError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.archive import ArtifactKind, extract_archive
from flexfed.common.formats.bundle import EXPERT_WEIGHTS
from flexfed.common.formats.safetensors_io import load_tensors, save_tensors
from flexfed.common.trust.ca import issue_certificate
from flexfed.common.trust.ca import revoke as ca_revoke
from flexfed.common.trust.keys import generate_key_and_csr
from flexfed.common.trust.log_events import parse_entry
from flexfed.common.trust.owner_request import sign_owner_request
from flexfed.common.trust.signing import BundleVerifier
from flexfed.server import lifecycle
from flexfed.server.config import load_config
from flexfed.server.consistency import check, collect_unsubmitted, recover
from flexfed.server.coordinator import Coordinator, CoordinatorExistsError, init_coordinator
from flexfed.server.lifecycle import StateError, _event, owner_request, release, revoke
from flexfed.server.pipeline import (
    REASON_CODES,
    CallerOrgError,
    SubmissionPipeline,
    acceptance_event,
)
from flexfed.server.registry import (
    ExpertRecord,
    ExpertState,
    Registry,
    ReleaseRecord,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server_member(pki: Pki) -> Member:
    out = pki.root / "members" / "server"
    req = generate_key_and_csr("consortium", out, "operator")
    cert = issue_certificate(pki.ca_dir, req.csr, "operator", out=out / "cert.pem")
    return Member("consortium", "operator", req.key, cert.path)


@pytest.fixture(scope="module")
def acme(pki: Pki) -> Member:
    return pki.member("acme")


def make_coordinator(root: Path, pki: Pki, server: Member, anchor: Anchor) -> Path:
    init_coordinator(
        root,
        ca_cert=pki.ca_pem,
        crl=pki.crl_pem,
        tls_cert=server.cert,
        tls_key=server.key,
        anchor_dir=anchor.path,
        origin="test.example/log",
    )
    return root


@pytest.fixture
def coordinator(
    tmp_path: Path, pki: Pki, server_member: Member, small_anchor: Anchor
) -> Iterator[Coordinator]:
    root = make_coordinator(tmp_path / "coord", pki, server_member, small_anchor)
    with Coordinator.open(root) as c:
        yield c


def upload(c: Coordinator, bundle: Path) -> str:
    return c.store.put_directory(bundle, ArtifactKind.EXPERT_BUNDLE).digest


def signed_bundle(
    anchor: Anchor, where: Path, member: Member, pki: Pki, seed: int, name: str = "expert"
) -> Path:
    bundle = make_expert_bundle(
        anchor, where / f"{member.org}-{name}-{seed}", member.org, seed, name
    )
    sign_bundle(bundle, member.key, member.cert, [pki.ca_pem])
    return bundle


def state_of(c: Coordinator) -> tuple[int, list[ExpertRecord], list[Path]]:
    return c.log.size, c.registry.experts(), sorted(c.config.staging_dir.iterdir())


# --- init and config ----------------------------------------------------------------------


def test_init_makes_a_complete_coordinator(coordinator: Coordinator) -> None:
    config = coordinator.config
    assert load_config(config.root) == config
    assert stat.S_IMODE(os.stat(config.log_key).st_mode) == 0o600
    assert config.anchor.artifact_digest in coordinator.store
    assert coordinator.store.info(config.anchor.artifact_digest).kind == ArtifactKind.ANCHOR
    assert coordinator.anchor.digest == config.anchor.digest
    assert coordinator.registry.anchor().artifact_digest == config.anchor.artifact_digest
    assert config.database_url == f"sqlite:///{config.root}/registry.db"
    assert coordinator.log.size == 0
    assert check(coordinator) == []


def test_init_never_overwrites(
    coordinator: Coordinator, pki: Pki, server_member: Member, small_anchor: Anchor
) -> None:
    before = coordinator.config.config_file.read_bytes()
    with pytest.raises(CoordinatorExistsError):
        make_coordinator(coordinator.config.root, pki, server_member, small_anchor)
    assert coordinator.config.config_file.read_bytes() == before


def test_init_refuses_a_tls_identity_that_is_not_an_operator(
    tmp_path: Path, pki: Pki, acme: Member, small_anchor: Anchor
) -> None:
    with pytest.raises(ConfigError, match="cannot be the coordinator's identity"):
        make_coordinator(tmp_path / "c", pki, acme, small_anchor)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('listen = "127.0.0.1:50051"', 'listen = "nowhere"'), "HOST:PORT"),
        (lambda t: t + "\n[extra]\n", "unknown setting"),
        (lambda t: t.replace("workers = 16", "workers = 0"), "workers must be a positive"),
        (
            lambda t: t.replace("workers = 16", "workers = 4"),
            r"reserved_workers \(4\) must be below",
        ),
        (lambda t: t.replace("max_concurrent_rpcs = 64", "max_concurrent_rpcs = 8"), "at least"),
        (lambda t: t.replace("streams_per_member = 2", "streams_per_member = 0"), "positive"),
        (lambda t: t.replace("[log]", "[log"), "not valid TOML"),
        (lambda t: t.replace('origin = "test.example/log"', 'origin = "a b"'), "log origin"),
    ],
)
def test_bad_config_says_what_to_fix(coordinator: Coordinator, edit, message: str) -> None:
    path = coordinator.config.config_file
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError, match=message):
        load_config(coordinator.config.root)


# --- the registry --------------------------------------------------------------------------


def test_registry_round_trips_experts_and_releases(tmp_path: Path) -> None:
    registry = Registry(f"sqlite:///{tmp_path}/r.db")
    record = ExpertRecord(
        "sha256:" + "a" * 64, "acme", "code", ExpertState.ACCEPTED, 0, "b" * 64, "c" * 64,
        "d" * 64, "e" * 64, "acme (owner, serial 01)", "2025-01-01T00:00:00+00:00",
    )  # fmt: skip
    assert registry.add_expert(record) == record
    assert registry.add_expert(record) == record  # idempotent
    assert registry.experts(org="acme") == [record]
    assert registry.experts(org="globex") == []
    moved = registry.set_state(record.expert_id, ExpertState.OPTED_OUT, 3, "2025-01-02")
    assert (moved.state, moved.state_log_index) == (ExpertState.OPTED_OUT, 3)
    assert registry.experts(state=ExpertState.ACCEPTED) == []
    release_v1 = ReleaseRecord(1, "sha256:" + "f" * 64, (record.expert_id,), 2, 4, "now")
    registry.add_release(release_v1)
    assert registry.releases() == [release_v1]
    assert registry.next_version() == 2
    with pytest.raises(ConfigError, match="clashes"):
        registry.add_release(release_v1)
    with registry.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


# --- submissions ---------------------------------------------------------------------------


def test_submission_is_accepted_once(
    coordinator: Coordinator, small_anchor: Anchor, acme: Member, pki: Pki, tmp_path: Path
) -> None:
    digest = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=1))
    pipeline = SubmissionPipeline(coordinator)
    first = pipeline.submit(digest, "acme")
    assert first.accepted and not first.already
    assert first.expert.expert_id == digest and first.expert.org == "acme"
    event = parse_entry(coordinator.log.entry(first.expert.log_index))
    assert event["type"] == "expert-accepted" and event["expert_id"] == digest
    again = pipeline.submit(digest, "acme")
    assert again.accepted and again.already and again.expert == first.expert
    assert coordinator.log.size == 1
    assert check(coordinator) == []


def _nan(bundle: Path) -> None:
    tensors = load_tensors(bundle / EXPERT_WEIGHTS)
    tensors["layers.0.up_proj.weight"][0, 0] = float("nan")
    save_tensors(bundle / EXPERT_WEIGHTS, tensors, {"format": "pt"})


def _flip_last_byte(bundle: Path) -> None:
    data = bytearray((bundle / EXPERT_WEIGHTS).read_bytes())
    data[-1] ^= 1
    (bundle / EXPERT_WEIGHTS).write_bytes(bytes(data))


def _edit(bundle: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_tensors(bundle / EXPERT_WEIGHTS)
    change(tensors)
    save_tensors(bundle / EXPERT_WEIGHTS, tensors, {"format": "pt"})


def _huge_down_proj(t: dict[str, torch.Tensor]) -> None:  # issue 12: constant logits
    t["layers.1.down_proj.weight"].fill_(3e38)


def _loud_router(t: dict[str, torch.Tensor]) -> None:  # issue 12: took 100 % of the routing
    t["layers.0.router.weight"].mul_(1000 / t["layers.0.router.weight"].norm())


def _positive_bias(t: dict[str, torch.Tensor]) -> None:
    t["layers.1.router.bias"].fill_(5.0)


def _each_matrix_within_but_loud_together(t: dict[str, torch.Tensor]) -> None:
    for proj in ("gate_proj", "up_proj", "down_proj"):  # RMS 3.5x each (under 4x) ...
        t[f"layers.0.{proj}.weight"].mul_(3.5)  # ... output about 40x


@pytest.mark.parametrize(
    ("case", "code", "reason"),
    [
        ("nan signed", "not-finite", None),
        ("weights changed after signing", "signature-invalid", None),
        (_huge_down_proj, "weights-implausible", "layer 1 down_proj: RMS "),
        (_loud_router, "router-implausible", "layer 0 router: row norm "),
        (_positive_bias, "router-implausible", "layer 1 router: row norm "),
        (_each_matrix_within_but_loud_together, "activations-implausible", "layer 0: on the "),
    ],
)
def test_a_refusal_changes_nothing(
    case: str | Callable[[dict[str, torch.Tensor]], None],
    code: str,
    reason: str | None,
    coordinator: Coordinator,
    small_anchor: Anchor,
    acme: Member,
    pki: Pki,
    tmp_path: Path,
) -> None:
    bundle = make_expert_bundle(small_anchor, tmp_path / "b", "acme", seed=2)
    if case == "nan signed":
        _nan(bundle)
        sign_bundle(bundle, acme.key, acme.cert, [pki.ca_pem])
    elif case == "weights changed after signing":
        sign_bundle(bundle, acme.key, acme.cert, [pki.ca_pem])
        _flip_last_byte(bundle)
    else:
        assert callable(case)
        _edit(bundle, case)  # finite, validly shaped, signed: only the gates can tell
        sign_bundle(bundle, acme.key, acme.cert, [pki.ca_pem])
    digest = upload(coordinator, bundle)
    before = state_of(coordinator)
    result = SubmissionPipeline(coordinator).submit(digest, "acme")
    assert not result.accepted and result.reason_code == code and code in REASON_CODES
    assert result.reason and "\n" not in result.reason
    assert reason is None or result.reason.startswith(reason), result.reason
    assert state_of(coordinator) == before


def test_not_uploaded_and_another_orgs_bundle_change_nothing(
    coordinator: Coordinator, small_anchor: Anchor, acme: Member, pki: Pki, tmp_path: Path
) -> None:
    pipeline = SubmissionPipeline(coordinator)
    before = state_of(coordinator)
    assert pipeline.submit("sha256:" + "0" * 64, "acme").reason_code == "not-uploaded"
    assert pipeline.submit("not a digest", "acme").reason_code == "not-uploaded"
    anchor_artifact = coordinator.config.anchor.artifact_digest
    assert pipeline.submit(anchor_artifact, None).reason_code == "bundle-invalid"
    digest = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=3))
    with pytest.raises(CallerOrgError):
        pipeline.submit(digest, "globex")
    assert state_of(coordinator) == before


def test_a_second_expert_with_the_same_name_is_refused(
    coordinator: Coordinator, small_anchor: Anchor, acme: Member, pki: Pki, tmp_path: Path
) -> None:
    pipeline = SubmissionPipeline(coordinator)
    first = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=4))
    second = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=5))
    assert pipeline.submit(first, "acme").accepted
    assert pipeline.submit(second, "acme").reason_code == "duplicate-name"
    revoke(coordinator, first, "test", "operator")
    assert pipeline.submit(first, None).reason_code == "expert-revoked"
    assert pipeline.submit(second, "acme").accepted  # other weights may take the name
    assert check(coordinator) == []


def test_one_set_of_weights_is_one_expert_from_one_org(
    coordinator: Coordinator, small_anchor: Anchor, acme: Member, pki: Pki, tmp_path: Path
) -> None:
    """Issue 12: a member re-signed another's expert (the same expert.safetensors) under its
    own name and was accepted; after the real owner opted out, its weights lived on in the
    copier's slot. Also: the same weights twice made every release fail ("given twice")."""
    globex = pki.member("globex")
    pipeline = SubmissionPipeline(coordinator)
    original = signed_bundle(small_anchor, tmp_path, acme, pki, seed=8)
    copy = signed_bundle(small_anchor, tmp_path, globex, pki, seed=8)  # acme's weights
    weights = EXPERT_WEIGHTS
    assert (original / weights).read_bytes() == (copy / weights).read_bytes()
    first = upload(coordinator, original)
    assert pipeline.submit(first, "acme").accepted
    copied = upload(coordinator, copy)
    before = state_of(coordinator)
    refused = pipeline.submit(copied, "globex")
    assert (refused.accepted, refused.reason_code, refused.reason) == (
        False,
        "weights-duplicate",
        "these weights were already submitted by another organisation; an expert's weights "
        "are accepted once, from one organisation",
    )
    again = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, 8, name="b"))
    twice = pipeline.submit(again, "acme")  # the owner itself, under a second name
    assert twice.reason_code == "weights-duplicate"
    assert twice.reason.startswith("these weights are already accepted as acme/expert (sha256:")
    assert state_of(coordinator)[:2] == before[:2]

    request = sign_owner_request("opt-out", first, "acme", acme.key, acme.cert)
    owner_request(coordinator, "opt-out", request, "acme")
    assert pipeline.submit(copied, "globex").reason_code == "weights-duplicate"  # still
    assert pipeline.submit(again, "acme").accepted  # the owner may replace its opted-out one
    assert check(coordinator) == []


def test_bundles_never_submitted_are_collected_after_their_days(
    coordinator: Coordinator, small_anchor: Anchor, acme: Member, pki: Pki, tmp_path: Path
) -> None:
    """Issue 12: finished but never submitted uploads were kept forever."""
    submitted = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=31))
    assert SubmissionPipeline(coordinator).submit(submitted, "acme").accepted
    stale = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, 32, name="s"))
    fresh = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, 33, name="f"))
    long_ago = "2026-01-01T00:00:00+00:00"  # more than the default 7 days
    for digest in (submitted, stale):
        meta = coordinator.store.blobs / (digest.removeprefix("sha256:") + ".json")
        doc = json.loads(meta.read_text())
        meta.write_text(json.dumps({**doc, "created": long_ago}))

    assert collect_unsubmitted(coordinator) == [stale]
    assert stale not in coordinator.store
    assert submitted in coordinator.store and fresh in coordinator.store
    assert coordinator.config.anchor.artifact_digest in coordinator.store  # not a bundle
    assert check(coordinator) == []


# --- crash recovery ------------------------------------------------------------------------


def test_recovery_restores_what_the_log_holds(
    coordinator: Coordinator, small_anchor: Anchor, acme: Member, pki: Pki, tmp_path: Path
) -> None:
    """A crash after the log append and before the registry write loses nothing."""
    pipeline = SubmissionPipeline(coordinator)
    kept = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=6, name="a"))
    assert pipeline.submit(kept, "acme").accepted
    lost = upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=7, name="b"))
    # What _accept does, cut short before the registry commit:
    bundle = extract_archive(coordinator.store.path(lost), tmp_path / "x")
    verified = BundleVerifier(coordinator.ca_cert, coordinator.current_crl()).verify(bundle)
    index = coordinator.log.append(acceptance_event(verified, lost, "2025-01-01T00:00:00+00:00"))
    # ... and an opt-out of the first expert logged without its registry update.
    opt_out = coordinator.log.append(
        _event("opt-out", coordinator.registry.require_expert(kept), "2025-01-02T00:00:00+00:00")
    )
    problems = check(coordinator)
    assert any(f"{lost}: accepted at log entry {index}" in p for p in problems)
    assert any(f"{kept}: registry state accepted, the log's opted_out" in p for p in problems)
    repairs = recover(coordinator)
    assert len(repairs) == 2
    assert coordinator.registry.require_expert(lost).log_index == index
    assert coordinator.registry.require_expert(kept).state is ExpertState.OPTED_OUT
    assert coordinator.registry.require_expert(kept).state_log_index == opt_out
    assert check(coordinator) == []
    assert recover(coordinator) == []


def test_releases_follow_the_current_crl(
    coordinator: Coordinator, small_anchor: Anchor, acme: Member, pki: Pki, tmp_path: Path
) -> None:
    """Issue 12: an expert whose signer's key was revoked for compromise was still released,
    and the release failed its own audit. A key compromise now revokes the expert (logged)
    and leaves it out; a routine rotation after the acceptance (superseded) does not."""
    compromised, rotated = pki.member("initech"), pki.member("umbrella")
    pipeline = SubmissionPipeline(coordinator)
    ids = {
        m.org: upload(coordinator, signed_bundle(small_anchor, tmp_path, m, pki, seed=s))
        for m, s in ((acme, 11), (compromised, 12), (rotated, 13))
    }
    for org, digest in ids.items():
        assert pipeline.submit(digest, org).accepted
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)  # after every acceptance
    ca_revoke(pki.ca_dir, compromised.cert, "key-compromise", at=later)
    ca_revoke(pki.ca_dir, rotated.cert, "superseded", at=later)

    with pytest.raises(
        StateError, match=r"its signer's certificate is revoked \(.*keyCompromise\)\)"
    ):
        release(coordinator, [ids["initech"]])
    expert = coordinator.registry.require_expert(ids["initech"])
    assert expert.state is ExpertState.REVOKED
    event = parse_entry(coordinator.log.entry(expert.state_log_index))
    assert (event["type"], event["signer"]) == ("revocation", "crl")
    assert event["reason"].startswith("signer certificate revoked: ")
    assert event["reason"].endswith("(reason: keyCompromise)")

    record = release(coordinator)
    assert list(record.expert_ids) == [ids["acme"], ids["umbrella"]]
    assert check(coordinator) == []


def test_release_stores_a_signed_model_and_recovery_finishes_an_interrupted_one(
    coordinator: Coordinator,
    small_anchor: Anchor,
    acme: Member,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pipeline = SubmissionPipeline(coordinator)
    ids = [
        upload(coordinator, signed_bundle(small_anchor, tmp_path, acme, pki, seed=s, name=f"e{s}"))
        for s in (8, 9)
    ]
    for digest in ids:
        assert pipeline.submit(digest, "acme").accepted
    record = release(coordinator)
    assert record.version == 1 and list(record.expert_ids) == ids and record.top_k == 3
    assert coordinator.store.info(record.model_artifact_digest).kind == ArtifactKind.MODEL
    event = parse_entry(coordinator.log.entry(record.log_index))
    assert event["type"] == "assembly-released"
    assert check(coordinator) == []
    assert list(coordinator.config.staging_dir.iterdir()) == []

    # A release whose log entry was written but whose row was not: recovery finishes it.
    def crash(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lifecycle, "finish_release", crash)
    with pytest.raises(KeyboardInterrupt):
        release(coordinator, [ids[0]])
    monkeypatch.undo()
    assert len(coordinator.registry.releases()) == 1
    assert any("a release the registry does not know" in p for p in check(coordinator))
    repairs = recover(coordinator)
    assert len(repairs) == 1 and "finished" in repairs[0]
    second = coordinator.registry.releases()[1]
    assert second.version == 2 and second.expert_ids == (ids[0],)
    assert second.model_artifact_digest in coordinator.store
    assert check(coordinator) == []

    # The same crash, but the staged model did not survive (the log entry did): recovery
    # records the release as lost, check agrees (a warning, not a disagreement), and a new
    # release supersedes it.
    monkeypatch.setattr(lifecycle, "finish_release", crash)
    with pytest.raises(KeyboardInterrupt):
        release(coordinator, [ids[1]])
    monkeypatch.undo()
    for staged in coordinator.config.staging_dir.iterdir():
        shutil.rmtree(staged)
    repairs = recover(coordinator)
    assert len(repairs) == 1 and "lost" in repairs[0]
    lost = coordinator.registry.releases()[2]
    assert lost.version == 3 and lost.model_artifact_digest == ""
    assert check(coordinator) == []
    assert release(coordinator).version == 4
    assert check(coordinator) == []


def test_the_operator_guide_lists_every_reason_code_and_no_other() -> None:
    guide = (Path(__file__).resolve().parents[3] / "docs" / "operator-guide.md").read_text()
    table = guide.split("### Submission reason codes")[1].split("\n### ")[0]
    documented = re.findall(r"^\| `([a-z-]+)` \|", table, re.M)
    assert sorted(documented) == sorted(REASON_CODES)
    assert "weights-duplicate" in documented  # the table is the one this test means
