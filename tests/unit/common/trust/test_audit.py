"""Whole-model audit: a release recorded in the log and signed by the coordinator, checked offline.

Protects: an assembled model keeps what rebuilds every slot's signed expert.safetensors byte
for byte (both families, any safetensors writer); a model assembled from signed bundles,
recorded in the log and signed by the operator passes ``audit_model``, and so does its
opt-out after recording and signing again (while the old model, audited against the newer
log, fails for still holding the opted-out expert); every way a release can be wrong,
including a coordinator that re-records and re-signs its own lies, fails with its own reason
code; ``flexfed audit verify`` exits 0 on a good model and 4 with one line on a bad one; the
model released by the first version (tests/fixtures/audit) keeps passing.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import model_signing.hashing
import model_signing.signing
import pytest
import torch
from click.testing import CliRunner
from conftest import make_expert_bundle, make_meta
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from safetensors.torch import save_file

from flexfed.client.sign import sign_bundle
from flexfed.common.cli import main
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import EXPERT_META, EXPERT_WEIGHTS, PROVENANCE, SIGNATURE
from flexfed.common.formats.safetensors_io import load_tensors, save_tensors
from flexfed.common.moe.assembly import (
    ASSEMBLY_FILE,
    PROVENANCE_DIR,
    ROUTER_BIAS_FILE,
    WEIGHTS_HEADER_FILE,
    assemble,
    rebuild_expert_weights,
)
from flexfed.common.moe.optout import AssembledModel, optout
from flexfed.common.public.tiny import build_anchor
from flexfed.common.translog.filelog import FileLog
from flexfed.common.trust.audit import audit_model
from flexfed.common.trust.audit_report import AuditReport, Reason
from flexfed.common.trust.ca import init_ca, issue_certificate, revoke
from flexfed.common.trust.keys import generate_key_and_csr
from flexfed.common.trust.log_events import (
    accepted_event,
    opt_out_event,
    parse_entry,
    release_slots,
)
from flexfed.common.trust.pki import load_certificate
from flexfed.common.trust.provenance import ProvenanceSigner
from flexfed.common.trust.release import (
    ReleaseSignerError,
    ReleaseStateError,
    content_digest,
    model_files,
    record_release,
    sign_release,
)
from flexfed.common.trust.signing import load_private_key
from flexfed.common.util.digest import sha256_file
from flexfed.common.util.jsonio import write_json
from flexfed.server.cli.release import group as release_cli

ROOT = Path(__file__).resolve().parents[4]
GOLDEN = ROOT / "tests" / "fixtures" / "audit"
MODEL_SIGNING = Path(sys.executable).parent / "model_signing"
ORIGIN = "flexfed.test/audit-log"
ORGS = ("acme", "globex", "initech")
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2}
# acme's trainer recorded a DP guarantee (client train --dp-epsilon); the audit reports it.
ACME_DP = {
    "target_epsilon": 8.0, "delta": 1e-05, "max_grad_norm": 1.0, "noise_multiplier": 0.4355,
    "sample_rate": 0.004, "steps": 100, "records": 2000, "expected_batch_size": 8.0,
    "accountant": "rdp", "epsilon": 7.998106, "steps_done": 100,
}  # fmt: skip


class Member(NamedTuple):
    key: Path
    cert: Path


@dataclass
class World:
    """One CA, three owners' signed experts and a released model, built once for the module."""

    root: Path
    anchor: Anchor
    other_anchor: Anchor
    members: dict[str, Member]  # org (and "operator") -> key, certificate
    bundles: dict[str, Path]
    model: Path  # assembled, recorded in `log`, signed; never modified by a test
    log: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_pem(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def operator(self) -> Member:
        return self.members["operator"]

    def member(self, org: str, role: str, ca_dir: Path | None = None) -> Member:
        out = self.root / "members" / f"{org}-{role}-{len(list(self.root.glob('members/*')))}"
        req = generate_key_and_csr(org, out, role)
        issued = issue_certificate(ca_dir or self.ca_dir, req.csr, role, out=out / "cert.pem")
        return Member(req.key, issued.path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("audit")
    anchor = build_anchor("olmo2", root / "anchor", num_attention_heads=2, **SMALL)
    other = build_anchor("olmo2", root / "other-anchor", seed=9, num_attention_heads=2, **SMALL)
    init_ca(root / "ca", "Audit Test CA")
    w = World(root, anchor, other, {}, {}, root / "released", root / "log.bin")
    w.members["operator"] = w.member("consortium", "operator")
    for seed, org in enumerate(ORGS, start=1):
        w.members[org] = w.member(org, "owner")
        bundle = make_expert_bundle(anchor, root / "bundles" / org, org, seed=seed)
        if org == "acme":
            meta = json.loads((bundle / EXPERT_META).read_text())
            meta["training"]["differential_privacy"] = ACME_DP
            write_json(bundle / EXPERT_META, meta)
        sign_bundle(bundle, *w.members[org], [w.ca_pem])
        w.bundles[org] = bundle
    assemble(anchor, [w.bundles[o] for o in ORGS], w.model, top_k=2)
    with FileLog(w.log) as log:
        record_release(w.model, log, w.operator.key, ORIGIN)
    sign_release(w.model, *w.operator, [w.ca_pem])
    return w


@dataclass
class Release:
    """A private copy of the released model and its log, for one test to change."""

    world: World
    model: Path
    log: Path
    ca_dir: Path

    @property
    def crl(self) -> Path:
        return self.ca_dir / "crl.pem"

    def audit(self, **overrides: Any) -> AuditReport:
        kwargs: dict[str, Any] = {
            "model_dir": self.model,
            "ca_cert": self.world.ca_pem,
            "crl": self.crl,
            "log": self.log,
            "log_key": self.world.operator.cert,  # the operator's key also signs the log
            **overrides,
        }
        return audit_model(**kwargs)

    def assembly(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.model / ASSEMBLY_FILE).read_text())
        return doc

    def write_assembly(self, doc: dict[str, Any]) -> None:
        write_json(self.model / ASSEMBLY_FILE, doc)

    def resign(self) -> None:
        """The coordinator signs whatever the directory holds now."""
        sign_release(self.model, *self.world.operator, [self.world.ca_pem])

    def rerelease(self) -> None:
        """The coordinator records the directory as a new release in the log, and signs it."""
        (self.model / "model.sig").unlink(missing_ok=True)
        doc = self.assembly()
        doc["release_log_index"] = doc["log_checkpoint"] = None
        self.write_assembly(doc)
        with FileLog(self.log) as log:
            record_release(self.model, log, self.world.operator.key, ORIGIN)
        self.resign()

    def prov(self, org: str) -> Path:
        return self.model / PROVENANCE_DIR / f"{org}--expert"


@pytest.fixture
def release(world: World, tmp_path: Path) -> Release:
    shutil.copytree(world.model, tmp_path / "model")
    shutil.copy(world.log, tmp_path / "log.bin")
    shutil.copytree(world.ca_dir, tmp_path / "ca")  # revocations stay in this test
    return Release(world, tmp_path / "model", tmp_path / "log.bin", tmp_path / "ca")


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def slot_of(rel: Release, org: str) -> int:
    return next(s["slot"] for s in rel.assembly()["slots"] if s["org"] == org)


def edit_tensors(rel: Release, edit: Callable[[dict[str, torch.Tensor], Any], None]) -> None:
    """Rewrite the (single-shard) checkpoint with some tensors changed."""
    path = rel.model / "model.safetensors"
    tensors = load_tensors(path)
    edit(tensors, AssembledModel(rel.model).family)
    save_tensors(path, tensors, {"format": "pt"})


def copy_slot(
    tensors: dict[str, torch.Tensor], family: Any, src: int, dst: int, swap: bool
) -> None:
    for layer in range(SMALL["num_hidden_layers"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            a, b = family.moe_expert_key(layer, src, proj), family.moe_expert_key(layer, dst, proj)
            if swap:
                tensors[a], tensors[b] = tensors[b].clone(), tensors[a].clone()
            else:
                tensors[b] = tensors[a].clone()
        router = tensors[family.moe_router_key(layer)]
        rows = router[[src, dst]].clone()
        router[dst] = rows[0]
        if swap:
            router[src] = rows[1]


def forge_bundle(bundle: Path, member: Member, ca_pem: Path) -> None:
    """Sign a bundle as model-signing and the provenance signer would, without flexfed's checks."""
    hashing = (
        model_signing.hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=[SIGNATURE, PROVENANCE], ignore_git_paths=False)
    )
    with tempfile.TemporaryDirectory() as tmp:
        sig = Path(tmp) / SIGNATURE
        model_signing.signing.Config().use_certificate_signer(
            private_key=member.key, signing_certificate=member.cert, certificate_chain=[ca_pem]
        ).set_hashing_config(hashing).sign(bundle, sig)
        shutil.copy(sig, bundle / SIGNATURE)
    ProvenanceSigner(load_private_key(member.key), load_certificate(member.cert)).sign(bundle)


def replace_expert_signature(
    rel: Release,
    org: str,
    signer: Member,
    edit_meta: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Rebuild org's bundle, edit expert.json, sign it (as ``signer``), put it back in the model.

    The coordinator then records the new meta digest in assembly.json, as a liar would.
    """
    model, index = AssembledModel(rel.model), slot_of(rel, org)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        rebuild_expert_weights(
            model.checkpoint, model.family, index, rel.prov(org), bundle / EXPERT_WEIGHTS
        )
        meta = json.loads((rel.prov(org) / EXPERT_META).read_text())
        if edit_meta is not None:
            edit_meta(meta)
        write_json(bundle / EXPERT_META, meta)
        if signer == rel.world.members[org]:
            sign_bundle(bundle, *signer, [rel.world.ca_pem])
        else:
            forge_bundle(bundle, signer, rel.world.ca_pem)
        for name in (EXPERT_META, SIGNATURE, PROVENANCE):
            shutil.copy(bundle / name, rel.prov(org) / name)
        doc = rel.assembly()
        doc["slots"][index]["meta_sha256"] = sha256_file(bundle / EXPERT_META)
        rel.write_assembly(doc)


def rewrite_log(
    rel: Release, events: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> None:
    with FileLog(rel.log) as log:
        old = [parse_entry(log.entry(i)) for i in range(log.size)]
    rel.log.unlink()
    with FileLog(rel.log) as log:
        for event in events(old):
            log.append(event)


def log_public_key(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    path.write_bytes(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


# --- rebuilding a slot's signed expert -----------------------------------------------------


def test_checkpoint_slots_rebuild_the_signed_experts_byte_for_byte(
    anchor: Anchor, expert_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """Both families, sharded, and a bundle whose safetensors another library wrote."""
    a, b = expert_factory("a", seed=1), expert_factory("b", seed=2)
    # The safetensors library orders tensors its own way (by dtype, then name) and pads the
    # header its own way: the kept header must make that layout come back too.
    c = tmp_path / "third-party" / "c-expert"
    c.mkdir(parents=True)
    tensors = load_tensors(expert_factory("c", seed=3) / EXPERT_WEIGHTS)
    save_file(dict(sorted(tensors.items(), reverse=True)), str(c / EXPERT_WEIGHTS))
    write_json(c / EXPERT_META, make_meta(anchor, "c").to_json())
    experts = [a, b, c]
    assemble(anchor, experts, tmp_path / "moe", top_k=2, max_shard_bytes=20_000)
    model = AssembledModel(tmp_path / "moe")
    assert len(model.checkpoint.weight_files) > 1
    for index, bundle in enumerate(experts, start=1):
        prov = tmp_path / "moe" / PROVENANCE_DIR / f"{bundle.name.split('-')[0]}--expert"
        assert sorted(p.name for p in prov.iterdir()) == sorted(
            [EXPERT_META, ROUTER_BIAS_FILE, WEIGHTS_HEADER_FILE]
        )
        out = tmp_path / f"rebuilt-{index}.safetensors"
        digest = rebuild_expert_weights(model.checkpoint, model.family, index, prov, out)
        assert out.read_bytes() == (bundle / EXPERT_WEIGHTS).read_bytes()
        assert digest == model.slots[index]["expert_sha256"] == sha256_file(out)
    header = (tmp_path / "moe" / PROVENANCE_DIR / "a--expert" / WEIGHTS_HEADER_FILE).read_bytes()
    assert json.loads(header)["__metadata__"] == {"format": "pt"}
    biases = load_tensors(tmp_path / "moe" / PROVENANCE_DIR / "a--expert" / ROUTER_BIAS_FILE)
    assert list(biases) == [f"layers.{i}.router.bias" for i in range(len(biases))]


# --- the good path -------------------------------------------------------------------------


def test_released_model_passes_the_audit(release: Release, world: World) -> None:
    report = release.audit(anchor=world.anchor)
    assert report.ok, report.summary()
    assert report.release_signer is not None and report.release_signer.startswith("consortium")
    assert [(s.slot, s.org) for s in report.slots] == [(0, None), *enumerate(ORGS, start=1)]
    for s in report.slots[1:]:
        assert s.signer is not None and s.signer.startswith(f"{s.org} (owner")
        assert s.expert_sha256 == sha256_file(world.bundles[str(s.org)] / EXPERT_WEIGHTS)
        assert s.checked == ["owner signature", "weights", "log"]
    assert [s.privacy for s in report.slots] == [
        None,
        {"epsilon": 7.998106, "delta": 1e-05, "max_grad_norm": 1.0, "noise_multiplier": 0.4355,
         "sample_rate": 0.004, "steps_done": 100},
        None,
        None,
    ]  # fmt: skip
    assert report.checked == [
        "release signature",
        "anchor",
        "each expert's certificate at its acceptance time in the log",
        "log checkpoint",
        "log",
    ]
    assert report.not_checked == []
    assert "passed" in report.summary()

    doc = release.assembly()
    with FileLog(release.log) as log:
        events = [parse_entry(log.entry(i)) for i in range(log.size)]
    assert [e["type"] for e in events] == ["expert-accepted"] * 3 + ["assembly-released"]
    assert [s.get("log_index") for s in doc["slots"]] == [None, 0, 1, 2]
    assert doc["release_log_index"] == 3
    assert report.log is not None and report.log["tree_size"] == 4
    assert events[3]["model_digest"] == report.model_digest
    assert events[3]["slots"] == release_slots(doc)


def test_third_party_model_signing_verifies_the_release(release: Release, world: World) -> None:
    run = subprocess.run(
        [str(MODEL_SIGNING), "verify", "certificate", str(release.model),
         "--signature", str(release.model / "model.sig"), "--certificate_chain", str(world.ca_pem)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0 and "Verification succeeded" in run.stdout, run.stderr


def test_without_crl_log_or_anchor_the_report_says_what_was_not_checked(release: Release) -> None:
    report = audit_model(release.model, release.world.ca_pem)
    assert report.ok
    assert len(report.not_checked) == 3 and report.log is None


def test_opt_out_then_record_and_sign_passes_and_the_old_release_fails(
    release: Release, world: World
) -> None:
    smaller = release.model.parent / "without-globex"
    optout(release.model, ["globex"], smaller)
    assert not (smaller / "model.sig").exists()  # the old signature is not carried over
    with FileLog(release.log) as log:
        record_release(smaller, log, world.operator.key, ORIGIN)
        last = parse_entry(log.entry(log.size - 2))
    sign_release(smaller, *world.operator, [world.ca_pem])
    assert last["type"] == "opt-out" and last["org"] == "globex"

    report = release.audit(model_dir=smaller, anchor=world.anchor)
    assert report.ok, report.summary()  # the opted-out config is still the anchor's, made MoE
    assert [s.org for s in report.slots] == [None, "acme", "initech"]
    assert [s.log_index for s in report.slots] == [None, 0, 2]  # accepted once, logged once

    old = release.audit()
    assert old.reasons == ["opted-out"]
    assert [f.slot for f in old.all_findings] == [2]


def test_each_owner_certificate_is_judged_when_its_expert_was_accepted(
    release: Release,
) -> None:
    """Issue 12 (and docs/pki.md's promise): after a routine key rotation (globex's key revoked
    as superseded, an hour after its expert's acceptance), every later audit of the release
    failed, judged at the audit's time. Judged at the acceptance time in the log, it passes;
    without the log there is no acceptance time and the audit's time decides; a key
    compromise voids the signature whenever the audit runs."""
    with FileLog(release.log) as log:
        accepted = dt.datetime.fromisoformat(parse_entry(log.entry(1))["time"])
    tomorrow = accepted + dt.timedelta(days=1)
    revoke(release.ca_dir, release.world.members["globex"].cert, "superseded",
           at=accepted + dt.timedelta(hours=1))  # fmt: skip
    report = release.audit(at=tomorrow)
    assert report.ok, report.summary()
    assert "each expert's certificate at its acceptance time in the log" in report.checked

    without_log = release.audit(at=tomorrow, log=None, log_key=None)
    assert without_log.reasons == ["owner-revoked"]
    assert [f.slot for f in without_log.all_findings] == [2]


def test_a_key_compromise_fails_the_audit_whenever_it_runs(release: Release) -> None:
    with FileLog(release.log) as log:
        accepted = dt.datetime.fromisoformat(parse_entry(log.entry(1))["time"])
    revoke(release.ca_dir, release.world.members["globex"].cert, "key-compromise",
           at=accepted + dt.timedelta(hours=1))  # fmt: skip
    report = release.audit(at=accepted + dt.timedelta(days=1))
    assert report.reasons == ["owner-revoked"]
    assert [f.slot for f in report.all_findings] == [2]


def test_edited_tokenizer_and_config_are_named(release: Release) -> None:
    report = release.audit(**_tokenizer_and_config_edited(release))
    assert [(str(f.reason), f.message) for f in report.all_findings] == [
        (
            "release-files-mismatch",
            "config.json differs from the anchor's in rms_norm_eps, rope_theta; tokenizer.json "
            "differs from the anchor's",
        )
    ]


def test_record_release_refuses_a_signed_or_recorded_model(release: Release) -> None:
    with FileLog(release.log) as log:
        with pytest.raises(ReleaseStateError, match="already signed"):
            record_release(release.model, log, release.world.operator.key, ORIGIN)
        (release.model / "model.sig").unlink()
        with pytest.raises(ReleaseStateError, match="already recorded"):
            record_release(release.model, log, release.world.operator.key, ORIGIN)


def test_record_release_refuses_a_model_holding_a_withdrawn_expert(release: Release) -> None:
    (release.model / "model.sig").unlink()
    doc = release.assembly()
    doc["release_log_index"] = doc["log_checkpoint"] = None
    release.write_assembly(doc)
    with FileLog(release.log) as log:
        log.append(opt_out_event("initech"))
        size = log.size
        with pytest.raises(ReleaseStateError, match=r"initech/expert is withdrawn \(opt-out"):
            record_release(release.model, log, release.world.operator.key, ORIGIN)
        assert log.size == size


def test_sign_release_refuses_owners_and_foreign_keys(release: Release, world: World) -> None:
    acme = world.members["acme"]
    with pytest.raises(ReleaseSignerError, match="owner certificate"):
        sign_release(release.model, *acme)
    with pytest.raises(ReleaseSignerError, match="not the private key"):
        sign_release(release.model, acme.key, world.operator.cert)


# --- the tamper catalogue ------------------------------------------------------------------


Tamper = Callable[[Release], dict[str, Any] | None]


def _shard_byte(rel: Release) -> None:
    flip_byte(rel.model / "model.safetensors", -1)  # model.norm.weight: a shared tensor


def _experts_swapped(rel: Release) -> None:
    edit_tensors(rel, lambda t, fam: copy_slot(t, fam, 1, 2, swap=True))
    rel.rerelease()


def _expert_duplicated(rel: Release) -> None:
    edit_tensors(rel, lambda t, fam: copy_slot(t, fam, 1, 2, swap=False))
    doc = rel.assembly()
    doc["slots"][2] = {**doc["slots"][1], "slot": 2}
    rel.write_assembly(doc)
    rel.rerelease()


def _expert_json_flipped(rel: Release) -> None:
    flip_byte(rel.prov("globex") / EXPERT_META, 20)
    rel.rerelease()


def _root_signature_missing(rel: Release) -> None:
    (rel.model / "model.sig").unlink()


def _root_signature_garbage(rel: Release) -> None:
    (rel.model / "model.sig").write_text("not a signature\n")


def _release_signed_by_an_owner(rel: Release) -> None:
    acme = rel.world.members["acme"]
    hashing = (
        model_signing.hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=["model.sig"], ignore_git_paths=False)
    )
    with tempfile.TemporaryDirectory() as tmp:
        model_signing.signing.Config().use_certificate_signer(
            private_key=acme.key,
            signing_certificate=acme.cert,
            certificate_chain=[rel.world.ca_pem],
        ).set_hashing_config(hashing).sign(rel.model, Path(tmp) / "model.sig")
        shutil.copy(Path(tmp) / "model.sig", rel.model / "model.sig")


def _release_signed_under_another_ca(rel: Release) -> None:
    init_ca(rel.model.parent / "other-ca", "Audit Test CA")  # same name, another key
    impostor = rel.world.member("consortium", "operator", rel.model.parent / "other-ca")
    sign_release(rel.model, *impostor, [rel.model.parent / "other-ca" / "ca.pem"])


def _operator_revoked(rel: Release) -> None:
    revoke(rel.ca_dir, rel.world.operator.cert, "key-compromise")


def _stale_crl(rel: Release) -> dict[str, Any]:
    return {"at": dt.datetime.now(dt.UTC) + dt.timedelta(days=31)}  # the CRL is good for 30


def _unsigned_file(rel: Release) -> None:
    (rel.model / "README.md").write_text("added after signing\n")


def _signed_file_deleted(rel: Release) -> None:
    (rel.model / "generation_config.json").unlink()


def _assembly_unreadable(rel: Release) -> None:
    (rel.model / ASSEMBLY_FILE).write_text("{ not json")
    rel.resign()


def _another_anchor(rel: Release) -> dict[str, Any]:
    return {"anchor": rel.world.other_anchor}


def _shared_tensor_changed(rel: Release) -> dict[str, Any]:
    _shard_byte(rel)
    rel.rerelease()
    return {"anchor": rel.world.anchor}


def _tokenizer_and_config_edited(rel: Release) -> dict[str, Any]:
    """Issue 12: two token ids swapped in tokenizer.json, rms_norm_eps and rope_theta changed,
    then recorded and signed by the operator: the tensors are all the anchor's."""
    tok = json.loads((rel.model / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (rel.model / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((rel.model / "config.json").read_text())
    config["rms_norm_eps"], config["rope_theta"] = 1e-3, 1234.0
    write_json(rel.model / "config.json", config)
    rel.rerelease()
    return {"anchor": rel.world.anchor}


def _record_lies(rel: Release) -> None:
    doc = rel.assembly()
    doc["slots"][1]["data_commitment"] = "f" * 64
    rel.write_assembly(doc)
    rel.resign()


def _rebuild_file_removed(rel: Release) -> None:
    (rel.prov("initech") / ROUTER_BIAS_FILE).unlink()
    rel.rerelease()


def _rebuild_header_renamed(rel: Release) -> None:
    path = rel.prov("initech") / WEIGHTS_HEADER_FILE
    path.write_bytes(path.read_bytes().replace(b"layers.0.up_proj", b"layers.0.xx_proj"))
    rel.rerelease()


def _owner_signature_garbage(rel: Release) -> None:
    (rel.prov("acme") / SIGNATURE).write_text("not a signature\n")
    rel.rerelease()


def _owner_revoked(rel: Release) -> None:
    revoke(rel.ca_dir, rel.world.members["globex"].cert, "key-compromise")


def _signed_by_another_org(rel: Release) -> None:
    replace_expert_signature(rel, "acme", rel.world.members["globex"])
    rel.rerelease()


def _signed_with_an_auditor_certificate(rel: Release) -> None:
    replace_expert_signature(rel, "acme", rel.world.member("acme", "auditor"))
    rel.rerelease()


def _trained_on_another_anchor(rel: Release) -> None:
    def other(meta: dict[str, Any]) -> None:
        meta["anchor_digest"] = rel.world.other_anchor.digest

    replace_expert_signature(rel, "globex", rel.world.members["globex"], other)
    rel.rerelease()


def _provenance_of_another_expert(rel: Release) -> None:
    shutil.copy(rel.prov("globex") / PROVENANCE, rel.prov("acme") / PROVENANCE)
    rel.rerelease()


def _not_in_log(rel: Release) -> None:
    """The coordinator logs every expert but globex's, and the release."""
    doc = rel.assembly()
    rel.log.unlink()
    key = load_private_key(rel.world.operator.key)
    with FileLog(rel.log) as log:
        for slot in doc["slots"][1:]:
            slot["log_index"] = None
            if slot["org"] != "globex":
                slot["log_index"] = log.append(accepted_event(slot, doc["anchor_digest"], "t"))
        files, _ = model_files(rel.model)
        digest = content_digest({rel_: sha256_file(p) for rel_, p in files.items()})
        doc["release_log_index"] = log.append(
            {"type": "assembly-released", "anchor_digest": doc["anchor_digest"],
             "model_digest": digest, "slots": release_slots(doc), "time": "t"}
        )  # fmt: skip
        doc["log_checkpoint"] = log.checkpoint(ORIGIN, key).to_text()
    rel.write_assembly(doc)
    rel.resign()


def _opted_out_but_present(rel: Release) -> None:
    with FileLog(rel.log) as log:
        log.append(opt_out_event("globex"))


def _revoked_in_log(rel: Release) -> None:
    with FileLog(rel.log) as log:
        log.append({"type": "revocation", "org": "initech", "reason": "licence ended"})


def _log_forked(rel: Release) -> None:
    fake = {"type": "revocation", "org": "nobody", "reason": "another history"}
    rewrite_log(rel, lambda events: [fake, *events])


def _log_lost_history(rel: Release) -> None:
    rewrite_log(rel, lambda events: events[:-1])


def _checkpoint_by_another_key(rel: Release) -> dict[str, Any]:
    return {"log_key": log_public_key(rel.model.parent / "other-log-key.pem")}


def _release_entry_elsewhere(rel: Release) -> None:
    doc = rel.assembly()
    doc["release_log_index"] = 0  # an expert-accepted entry, not this release
    rel.write_assembly(doc)
    rel.resign()


def _never_recorded(rel: Release) -> None:
    doc = rel.assembly()
    doc["release_log_index"] = doc["log_checkpoint"] = None
    rel.write_assembly(doc)
    rel.resign()


# case -> (tamper, the reason it is about, every reason expected, slots of slot findings)
TAMPER_CASES: dict[str, tuple[Tamper, Reason, set[str], set[int]]] = {
    "byte flipped in a weight shard": (
        _shard_byte, Reason.RELEASE_FILE_MODIFIED, {"release-file-modified", "release-not-in-log"},
        set(),
    ),
    "experts swapped between slots, re-released": (
        _experts_swapped, Reason.WEIGHTS_MISMATCH, {"weights-mismatch"}, {1, 2}
    ),
    "one expert in two slots, re-released": (
        _expert_duplicated, Reason.DUPLICATE_EXPERT, {"duplicate-expert"}, {2}
    ),
    "provenance expert.json flipped, re-released": (
        _expert_json_flipped, Reason.EXPERT_JSON_MODIFIED, {"expert-json-modified"}, {2}
    ),
    "root model.sig missing": (
        _root_signature_missing, Reason.RELEASE_UNSIGNED, {"release-unsigned"}, set()
    ),
    "root model.sig garbage": (
        _root_signature_garbage, Reason.RELEASE_SIGNATURE_INVALID, {"release-signature-invalid"},
        set(),
    ),
    "release signed by an owner": (
        _release_signed_by_an_owner, Reason.RELEASE_SIGNER_NOT_OPERATOR,
        {"release-signer-not-operator"}, set(),
    ),
    "release signed under another CA": (
        _release_signed_under_another_ca, Reason.RELEASE_SIGNER_UNTRUSTED,
        {"release-signer-untrusted", "release-signature-invalid"}, set(),
    ),
    "operator certificate revoked": (
        _operator_revoked, Reason.RELEASE_SIGNER_REVOKED, {"release-signer-revoked"}, set()
    ),
    "stale CRL": (_stale_crl, Reason.CRL_INVALID, {"crl-invalid"}, {1, 2, 3}),
    "unsigned file added": (
        _unsigned_file, Reason.RELEASE_FILE_UNSIGNED,
        {"release-file-unsigned", "release-not-in-log"}, set(),
    ),
    "signed file deleted": (
        _signed_file_deleted, Reason.RELEASE_FILE_MISSING,
        {"release-file-missing", "release-not-in-log"}, set(),
    ),
    "assembly.json unreadable, re-signed": (
        _assembly_unreadable, Reason.MODEL_UNREADABLE, {"model-unreadable"}, set()
    ),
    "audited against another anchor": (
        _another_anchor, Reason.ANCHOR_MISMATCH, {"anchor-mismatch"}, set()
    ),
    "shared tensor changed, re-released": (
        _shared_tensor_changed, Reason.PUBLIC_WEIGHTS_MISMATCH, {"public-weights-mismatch"}, set()
    ),
    "tokenizer and config edited, re-released": (
        _tokenizer_and_config_edited, Reason.RELEASE_FILES_MISMATCH, {"release-files-mismatch"},
        set(),
    ),
    "assembly.json misdescribes a slot, re-signed": (
        _record_lies, Reason.RECORD_MISMATCH, {"record-mismatch"}, {1}
    ),
    "rebuild file removed, re-released": (
        _rebuild_file_removed, Reason.PROVENANCE_INCOMPLETE, {"provenance-incomplete"}, {3}
    ),
    "rebuild header edited, re-released": (
        _rebuild_header_renamed, Reason.REBUILD_FAILED, {"rebuild-failed"}, {3}
    ),
    "owner signature garbage, re-released": (
        _owner_signature_garbage, Reason.BUNDLE_SIGNATURE_INVALID, {"bundle-signature-invalid"},
        {1},
    ),
    "owner certificate revoked": (_owner_revoked, Reason.OWNER_REVOKED, {"owner-revoked"}, {2}),
    "expert signed with an auditor certificate, re-released": (
        _signed_with_an_auditor_certificate, Reason.OWNER_CERTIFICATE_INVALID,
        {"owner-certificate-invalid"}, {1},
    ),
    "expert signed by another org, re-released": (
        _signed_by_another_org, Reason.SIGNER_ORG_MISMATCH, {"signer-org-mismatch"}, {1}
    ),
    "expert trained on another anchor, re-released": (
        _trained_on_another_anchor, Reason.EXPERT_ANCHOR_MISMATCH, {"expert-anchor-mismatch"},
        {2},
    ),
    "provenance of another expert, re-released": (
        _provenance_of_another_expert, Reason.PROVENANCE_INVALID, {"provenance-invalid"}, {1}
    ),
    "an expert missing from the log": (_not_in_log, Reason.NOT_IN_LOG, {"not-in-log"}, {2}),
    "opted out in the log, still in the model": (
        _opted_out_but_present, Reason.OPTED_OUT, {"opted-out"}, {2}
    ),
    "revoked in the log, still in the model": (
        _revoked_in_log, Reason.REVOKED_IN_LOG, {"revoked-in-log"}, {3}
    ),
    "log forked": (_log_forked, Reason.LOG_FORK, {"log-fork"}, set()),
    "log lost history": (_log_lost_history, Reason.LOG_FORK, {"log-fork"}, set()),
    "log checkpoint by another key": (
        _checkpoint_by_another_key, Reason.LOG_CHECKPOINT_INVALID, {"log-checkpoint-invalid"},
        set(),
    ),
    "release entry index points elsewhere, re-signed": (
        _release_entry_elsewhere, Reason.RELEASE_NOT_IN_LOG, {"release-not-in-log"}, set()
    ),
    "release never recorded, re-signed": (
        _never_recorded, Reason.LOG_NOT_RECORDED, {"log-not-recorded"}, set()
    ),
}  # fmt: skip


def test_every_reason_has_a_tamper_case_and_a_line_in_the_auditor_guide() -> None:
    assert {reason for _, reason, _, _ in TAMPER_CASES.values()} == set(Reason)
    guide = (ROOT / "docs" / "auditor-guide.md").read_text()
    documented = set(re.findall(r"^\| `([a-z-]+)` \| (?:model|slot)", guide, re.M))
    assert documented == {str(r) for r in Reason}


@pytest.mark.parametrize("case", list(TAMPER_CASES))
def test_tampering_is_caught_with_its_own_reason(case: str, release: Release) -> None:
    tamper, reason, expected, slots = TAMPER_CASES[case]
    overrides = tamper(release) or {}
    report = release.audit(**overrides)
    assert not report.ok
    assert set(report.reasons) == expected, f"{case}: {report.summary()}"
    assert reason in {f.reason for f in report.all_findings}
    assert {f.slot for f in report.all_findings if f.slot is not None} == slots, report.summary()
    for finding in report.all_findings:
        assert finding.message and "\n" not in finding.message
    assert "\n" not in report.summary()


# --- the command line ----------------------------------------------------------------------


def run_flexfed(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return int(info.value.code or 0), out.out, out.err


def test_audit_verify_exits_0_on_a_good_model_and_4_on_a_tampered_one(
    release: Release, world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["audit", "verify", release.model, "--trust", world.ca_pem, "--crl", release.crl,
            "--log", release.log, "--log-key", world.operator.cert]  # fmt: skip
    code, out, err = run_flexfed(capsys, *args)
    assert code == 0, err
    assert "result       PASS" in out and "acme/expert" in out and err == ""
    assert "DP epsilon 7.998106 (delta 1e-05)" in out

    code, out, _ = run_flexfed(capsys, "audit", "report", *args[2:], "--format", "json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, _ = run_flexfed(capsys, "audit", "report", *args[2:], "--format", "markdown")
    assert code == 0 and out.startswith(f"# Audit of `{release.model}`: PASS")
    assert "| DP epsilon 7.998106, delta 1e-05 |" in out and "| no DP |" in out

    _experts_swapped(release)
    code, out, err = run_flexfed(capsys, *args)
    assert code == 4
    assert err.count("\n") == 1 and err.startswith("flexfed: error: audit of ")
    assert "weights-mismatch (slot 1), weights-mismatch (slot 2)" in err
    assert "FAIL weights-mismatch" in out and "result       FAIL (2 problem(s))" in out

    code, out, _ = run_flexfed(capsys, "audit", "report", *args[2:], "--format", "markdown")
    assert code == 0 and "**weights-mismatch** (slot 1)" in out

    code, _, err = run_flexfed(capsys, *args[:-2])  # --log without --log-key
    assert code == 2 and "--log needs --log-key" in err


def test_release_commands_record_then_sign(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, log = tmp_path / "model", tmp_path / "log.bin"
    assemble(world.anchor, [world.bundles["acme"]], model)
    runner = CliRunner()
    result = runner.invoke(
        release_cli,
        ["record", str(model), "--log", str(log), "--log-key", str(world.operator.key),
         "--origin", ORIGIN],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "recorded" in result.output and "entry 1" in result.output
    result = runner.invoke(
        release_cli,
        ["sign", str(model), "--key", str(world.operator.key), "--cert", str(world.operator.cert),
         "--chain", str(world.ca_pem)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    code, out, err = run_flexfed(
        capsys, "audit", "verify", model, "--trust", world.ca_pem, "--log", log,
        "--log-key", world.operator.cert,
    )  # fmt: skip
    assert code == 0, out + err


# --- golden fixture ------------------------------------------------------------------------


def test_golden_release_keeps_passing_the_audit() -> None:
    """A model released by the first version must pass in every later one (see README.txt)."""
    expected = json.loads((GOLDEN / "expected.json").read_text())
    report = audit_model(
        GOLDEN / "model",
        GOLDEN / "ca.pem",
        GOLDEN / "crl.pem",
        GOLDEN / "log.bin",
        GOLDEN / "log-key.public.pem",
        dt.datetime.fromisoformat(expected["at"]),
    )
    assert report.ok, report.summary()
    assert report.anchor_digest == expected["anchor_digest"]
    assert report.model_digest == expected["model_digest"]
    assert report.release_signer == expected["release_signer"]
    assert report.log == expected["log"]
    assert [
        {k: s.to_json()[k] for k in ("slot", "org", "name", "expert_sha256", "log_index")}
        for s in report.slots
    ] == expected["slots"]
    run = subprocess.run(
        [str(MODEL_SIGNING), "verify", "certificate", str(GOLDEN / "model"),
         "--signature", str(GOLDEN / "model" / "model.sig"),
         "--certificate_chain", str(GOLDEN / "ca.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr


def test_golden_release_still_catches_tampering(tmp_path: Path) -> None:
    expected = json.loads((GOLDEN / "expected.json").read_text())
    shutil.copytree(GOLDEN / "model", tmp_path / "model")
    flip_byte(tmp_path / "model" / PROVENANCE_DIR / "golden-a--golden" / ROUTER_BIAS_FILE, -1)
    report = audit_model(
        tmp_path / "model", GOLDEN / "ca.pem", at=dt.datetime.fromisoformat(expected["at"])
    )
    assert report.reasons == ["release-file-modified", "weights-mismatch"]
