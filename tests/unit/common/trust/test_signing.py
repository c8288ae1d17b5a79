"""Signed expert bundles: model.sig and provenance, made by BundleSigner, checked by BundleVerifier.

Protects: a bundle signed by an owner verifies and the verifier reports who signed which bytes
from which anchor; every way a bundle, its signature, its certificate or its provenance can be
wrong fails with its own VerificationError subclass (never a ValueError); the signer refuses
another org's certificate and a key that is not the certificate's; third-party tools agree
(`model_signing verify certificate`, `openssl verify` with the CRL, and the auditor guide's
script, run verbatim); bundles signed by the first release (tests/fixtures/signing) keep
verifying.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import model_signing.hashing
import model_signing.signing
import pytest
from click.testing import CliRunner
from conftest import make_expert_bundle
from consortium import Member, Pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from flexfed.client.sign import sign, sign_bundle
from flexfed.common.errors import BundleError, InvalidInputError, VerificationError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import (
    EXPERT_META,
    EXPERT_WEIGHTS,
    PROVENANCE,
    SIGNATURE,
    read_expert_meta,
)
from flexfed.common.public.tiny import build_anchor
from flexfed.common.trust.ca import init_ca, issue_certificate, revoke
from flexfed.common.trust.keys import generate_key_and_csr
from flexfed.common.trust.pki import (
    CertificateExpiredError,
    CertificateNotYetValidError,
    CertificateRevokedError,
    CertificateRoleError,
    CrlStaleError,
    UntrustedCertificateError,
    load_certificate,
)
from flexfed.common.trust.provenance import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ProvenanceSigner,
    build_statement,
    pae,
    sign_envelope,
)
from flexfed.common.trust.signing import (
    AnchorDigestMismatchError,
    BundleSignatureError,
    BundleVerifier,
    CertificateOrgMismatchError,
    KeyCertificateMismatchError,
    MalformedProvenanceError,
    MalformedSignatureError,
    MissingProvenanceError,
    MissingSignatureError,
    ProvenanceBuilderError,
    ProvenanceDependencyError,
    ProvenanceSignatureError,
    ProvenanceSignerMismatchError,
    ProvenanceSubjectError,
    SignedFilesMismatchError,
    SignerCertificateError,
    SignerOrgMismatchError,
    TamperedMetadataError,
    TamperedWeightsError,
    UnexpectedFileError,
    VerifiedBundle,
    load_private_key,
)
from flexfed.common.util.digest import manifest_digest, sha256_file

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not on PATH")
VENV_BIN = Path(sys.executable).parent
MODEL_SIGNING = VENV_BIN / "model_signing"
ROOT = Path(__file__).resolve().parents[4]
GOLDEN = ROOT / "tests" / "fixtures" / "signing"
AUDITOR_GUIDE = ROOT / "docs" / "auditor-guide.md"


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def alice(pki: Pki) -> Member:
    return pki.member("alice")


@pytest.fixture
def bundle(small_anchor: Anchor, tmp_path: Path) -> Path:
    """An unsigned expert bundle of org alice."""
    return make_expert_bundle(small_anchor, tmp_path / "expert", "alice", seed=1)


@pytest.fixture
def signed(bundle: Path, alice: Member, pki: Pki) -> Path:
    sign_bundle(bundle, alice.key, alice.cert, [pki.ca_pem])
    return bundle


def verifier(pki: Pki, anchor: Anchor, **overrides: Any) -> BundleVerifier:
    kwargs: dict[str, Any] = {
        "ca_cert": pki.ca_pem,
        "crl": pki.crl_pem,
        "expected_anchor_digest": anchor.digest,
        **overrides,
    }
    return BundleVerifier(**kwargs)


def forge(
    bundle: Path,
    member: Member,
    chain: Path,
    *,
    ignore: tuple[str, ...] = (SIGNATURE, PROVENANCE),
) -> None:
    """Sign as flexfed does but without the signer's refusals: model_signing's API directly."""
    hashing = (
        model_signing.hashing.Config()
        .use_file_serialization(hashing_algorithm="sha256")
        .set_ignored_paths(paths=list(ignore), ignore_git_paths=False)
    )
    with tempfile.TemporaryDirectory() as tmp:
        sig = Path(tmp) / SIGNATURE
        model_signing.signing.Config().use_certificate_signer(
            private_key=member.key, signing_certificate=member.cert, certificate_chain=[chain]
        ).set_hashing_config(hashing).sign(bundle, sig)
        shutil.copy(sig, bundle / SIGNATURE)
    ProvenanceSigner(load_private_key(member.key), load_certificate(member.cert)).sign(bundle)


def write_provenance(bundle: Path, member: Member, statement: dict[str, Any]) -> None:
    envelope = sign_envelope(statement, load_private_key(member.key), load_certificate(member.cert))
    (bundle / PROVENANCE).write_text(json.dumps(envelope))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# --- the good path -------------------------------------------------------------------------


def test_signed_bundle_verifies_and_reports_what_was_verified(
    signed: Path, pki: Pki, alice: Member, small_anchor: Anchor
) -> None:
    result = verifier(pki, small_anchor).verify(signed)
    cert = load_certificate(alice.cert)
    meta = read_expert_meta(signed / EXPERT_META)
    assert isinstance(result, VerifiedBundle)
    assert (result.org, result.role, result.expert_name) == ("alice", "owner", "expert")
    assert result.cert_serial == f"{cert.serial_number:X}"
    assert result.cert_fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    weights = sha256_file(signed / EXPERT_WEIGHTS)
    assert result.signed_files == {
        EXPERT_META: sha256_file(signed / EXPERT_META),
        EXPERT_WEIGHTS: weights,
    }
    assert result.weights_sha256 == weights
    assert result.manifest_digest == manifest_digest(dict(result.signed_files))
    assert result.anchor_digest == small_anchor.digest == meta.anchor_digest
    assert result.data_commitment == meta.data_commitment
    assert result.code_version == "unknown"  # the test bundle's training summary has none
    assert result.provenance.subject_sha256 == weights
    assert result.provenance.builder_id == "flexfed://org/alice"
    assert result.validated is None
    assert "alice" in str(result)


def test_with_the_anchor_the_bundle_is_also_validated_structurally(
    signed: Path, pki: Pki, small_anchor: Anchor
) -> None:
    result = BundleVerifier(pki.ca_pem, pki.crl_pem, anchor=small_anchor).verify(signed)
    assert result.validated is not None
    assert result.validated.weights_sha256 == result.weights_sha256


def test_signing_twice_replaces_the_signatures(
    signed: Path, pki: Pki, alice: Member, small_anchor: Anchor
) -> None:
    first = (signed / SIGNATURE).read_bytes()
    sign_bundle(signed, alice.key, alice.cert, [pki.ca_pem])
    assert (signed / SIGNATURE).read_bytes() != first  # ECDSA signatures are randomised
    verifier(pki, small_anchor).verify(signed)
    assert sorted(p.name for p in signed.iterdir()) == sorted(
        [EXPERT_META, EXPERT_WEIGHTS, SIGNATURE, PROVENANCE]
    )


def test_provenance_is_an_in_toto_slsa_statement_over_the_weights(signed: Path) -> None:
    envelope = json.loads((signed / PROVENANCE).read_text())
    assert envelope["payloadType"] == PAYLOAD_TYPE
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["_type"] == STATEMENT_TYPE
    assert statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [
        {"name": EXPERT_WEIGHTS, "digest": {"sha256": sha256_file(signed / EXPERT_WEIGHTS)}}
    ]
    deps = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert [d["uri"] for d in deps] == ["flexfed:anchor", "flexfed:data-commitment", "flexfed:code"]
    (sig,) = envelope["signatures"]
    cert = x509.load_pem_x509_certificate(sig["certificate"].encode())
    assert sig["keyid"] == cert.fingerprint(hashes.SHA256()).hex()


def test_pae_follows_the_dsse_spec() -> None:
    assert pae(PAYLOAD_TYPE, b"hello") == b"DSSEv1 28 application/vnd.in-toto+json 5 hello"
    assert pae("t", b"") == b"DSSEv1 1 t 0 "


def test_a_model_sig_made_by_the_model_signing_cli_verifies(
    bundle: Path, pki: Pki, alice: Member, small_anchor: Anchor
) -> None:
    """Interoperability the other way round: the third-party signer, our verifier."""
    run = subprocess.run(
        [
            str(MODEL_SIGNING),
            "sign",
            "certificate",
            str(bundle),
            "--signature",
            str(bundle / SIGNATURE),
            "--ignore-paths",
            str(bundle / PROVENANCE),
            "--private_key",
            str(alice.key),
            "--signing_certificate",
            str(alice.cert),
            "--certificate_chain",
            str(pki.ca_pem),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    ProvenanceSigner(load_private_key(alice.key), load_certificate(alice.cert)).sign(bundle)
    assert verifier(pki, small_anchor).verify(bundle).org == "alice"


# --- the tamper catalogue ------------------------------------------------------------------


@dataclass
class Case:
    pki: Pki
    alice: Member
    bundle: Path
    anchor: Anchor


def _weights_byte(c: Case) -> None:
    flip_byte(c.bundle / EXPERT_WEIGHTS, -1)


def _metadata_byte(c: Case) -> None:
    flip_byte(c.bundle / EXPERT_META, 20)


def _provenance_payload_byte(c: Case) -> None:
    path = c.bundle / PROVENANCE
    envelope = json.loads(path.read_text())
    payload = bytearray(base64.b64decode(envelope["payload"]))
    payload[len(payload) // 2] ^= 0x01
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()
    path.write_text(json.dumps(envelope))


def _provenance_file_byte(c: Case) -> None:
    flip_byte(c.bundle / PROVENANCE, 0)  # "{" -> "z": no longer an envelope


def _model_sig_manifest_rewritten(c: Case) -> None:
    """Change the weights and rewrite the signed manifest to match, without the key."""
    flip_byte(c.bundle / EXPERT_WEIGHTS, -1)
    path = c.bundle / SIGNATURE
    oms = json.loads(path.read_text())
    statement = json.loads(base64.b64decode(oms["dsseEnvelope"]["payload"]))
    digests = {}
    for res in statement["predicate"]["resources"]:
        if res["name"] == EXPERT_WEIGHTS:
            res["digest"] = sha256_file(c.bundle / EXPERT_WEIGHTS)
        digests[res["name"]] = res["digest"]
    statement["subject"][0]["digest"]["sha256"] = manifest_digest(digests)
    oms["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    path.write_text(json.dumps(oms))


def _model_sig_garbage(c: Case) -> None:
    (c.bundle / SIGNATURE).write_text("this is not a signature\n")


def _model_sig_missing(c: Case) -> None:
    (c.bundle / SIGNATURE).unlink()


def _provenance_missing(c: Case) -> None:
    (c.bundle / PROVENANCE).unlink()


def _extra_file(c: Case) -> None:
    (c.bundle / "README.md").write_text("unsigned words\n")


def _another_orgs_certificate(c: Case) -> None:
    forge(c.bundle, c.pki.member("bob"), c.pki.ca_pem)


def _expired_certificate(c: Case) -> dict[str, Any]:
    short = c.pki.member(
        "alice",
        name="short",
        # NOTE: not before the CA's own notBefore: model_signing checks the chain at the
        # leaf's notBefore, when a younger CA would not be valid yet.
        not_before=now(),
        not_after=now() + dt.timedelta(hours=1),
    )
    sign_bundle(c.bundle, short.key, short.cert, [c.pki.ca_pem])
    return {"at": now() + dt.timedelta(hours=2)}


def _not_yet_valid_certificate(c: Case) -> None:
    later = c.pki.member(
        "alice",
        name="later",
        not_before=now() + dt.timedelta(days=1),
        not_after=now() + dt.timedelta(days=30),
    )
    forge(c.bundle, later, c.pki.ca_pem)


def _revoked_certificate(c: Case) -> None:
    revoke(c.pki.ca_dir, c.alice.cert, "key-compromise")


def _stale_crl(c: Case) -> dict[str, Any]:
    return {"at": now() + dt.timedelta(days=31)}  # the CRL is good for 30 days


def _certificate_from_another_ca(c: Case) -> None:
    other = Pki(c.pki.root.parent / "other-pki", name="Other CA")
    impostor = other.member("alice")
    sign_bundle(c.bundle, impostor.key, impostor.cert, [other.ca_pem])


def _wrong_expected_anchor(c: Case) -> dict[str, Any]:
    return {"expected_anchor_digest": "f" * 64}


def _provenance_for_other_weights(c: Case) -> None:
    meta = read_expert_meta(c.bundle / EXPERT_META)
    write_provenance(c.bundle, c.alice, build_statement(meta, "0" * 64))


def _provenance_by_another_key(c: Case) -> None:
    second = c.pki.member("alice", name="alice-second-key")
    ProvenanceSigner(load_private_key(second.key), load_certificate(second.cert)).sign(c.bundle)


def _provenance_other_data_commitment(c: Case) -> None:
    meta = read_expert_meta(c.bundle / EXPERT_META)
    other = replace(meta, data_commitment="1" * 64)
    write_provenance(
        c.bundle, c.alice, build_statement(other, sha256_file(c.bundle / EXPERT_WEIGHTS))
    )


def _provenance_other_builder(c: Case) -> None:
    meta = read_expert_meta(c.bundle / EXPERT_META)
    statement = build_statement(meta, sha256_file(c.bundle / EXPERT_WEIGHTS))
    statement["predicate"]["runDetails"]["builder"]["id"] = "flexfed://org/mallory"
    write_provenance(c.bundle, c.alice, statement)


def _auditor_certificate(c: Case) -> None:
    forge(c.bundle, c.pki.member("alice", "auditor"), c.pki.ca_pem)


def _signature_covers_only_the_weights(c: Case) -> None:
    forge(c.bundle, c.alice, c.pki.ca_pem, ignore=(SIGNATURE, PROVENANCE, EXPERT_META))


TAMPER_CASES: dict[str, tuple[Callable[[Case], dict[str, Any] | None], type[Exception]]] = {
    "weights byte flipped": (_weights_byte, TamperedWeightsError),
    "expert.json byte flipped": (_metadata_byte, TamperedMetadataError),
    "provenance payload byte flipped": (_provenance_payload_byte, ProvenanceSignatureError),
    "provenance file byte flipped": (_provenance_file_byte, MalformedProvenanceError),
    "signed manifest rewritten": (_model_sig_manifest_rewritten, BundleSignatureError),
    "model.sig garbage": (_model_sig_garbage, MalformedSignatureError),
    "model.sig missing": (_model_sig_missing, MissingSignatureError),
    "provenance missing": (_provenance_missing, MissingProvenanceError),
    "unsigned extra file": (_extra_file, UnexpectedFileError),
    "another org's certificate": (_another_orgs_certificate, SignerOrgMismatchError),
    "expired certificate": (_expired_certificate, CertificateExpiredError),
    "certificate not yet valid": (_not_yet_valid_certificate, CertificateNotYetValidError),
    "revoked certificate": (_revoked_certificate, CertificateRevokedError),
    "stale CRL": (_stale_crl, CrlStaleError),
    "certificate from another CA": (_certificate_from_another_ca, UntrustedCertificateError),
    "wrong expected anchor": (_wrong_expected_anchor, AnchorDigestMismatchError),
    "provenance for other weights": (_provenance_for_other_weights, ProvenanceSubjectError),
    "provenance by another key": (_provenance_by_another_key, ProvenanceSignerMismatchError),
    "provenance names another data commitment": (
        _provenance_other_data_commitment,
        ProvenanceDependencyError,
    ),
    "provenance names another builder": (_provenance_other_builder, ProvenanceBuilderError),
    "auditor certificate signs": (_auditor_certificate, CertificateRoleError),
    "signature covers only the weights": (
        _signature_covers_only_the_weights,
        SignedFilesMismatchError,
    ),
}


def test_every_tamper_case_has_its_own_error_class() -> None:
    classes = [cls for _, cls in TAMPER_CASES.values()]
    assert len(set(classes)) == len(classes) >= 10
    for cls in classes:
        assert issubclass(cls, VerificationError)
        assert not issubclass(cls, ValueError)


@pytest.mark.parametrize("case", list(TAMPER_CASES))
def test_tampering_is_caught_with_its_own_error(
    case: str, signed: Path, pki: Pki, alice: Member, small_anchor: Anchor
) -> None:
    tamper, expected = TAMPER_CASES[case]
    overrides = tamper(Case(pki, alice, signed, small_anchor)) or {}
    with pytest.raises(VerificationError) as info:
        verifier(pki, small_anchor, **overrides).verify(signed)
    assert type(info.value) is expected, f"{case}: {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert message and "\n" not in message


# --- the signer's refusals -----------------------------------------------------------------


def test_signer_refuses_another_orgs_certificate(bundle: Path, pki: Pki) -> None:
    bob = pki.member("bob")
    with pytest.raises(CertificateOrgMismatchError, match=r"'bob'.*'alice'"):
        sign_bundle(bundle, bob.key, bob.cert, [pki.ca_pem])
    assert not (bundle / SIGNATURE).exists() and not (bundle / PROVENANCE).exists()


def test_signer_refuses_a_key_that_is_not_the_certificates(
    bundle: Path, pki: Pki, alice: Member
) -> None:
    other = pki.member("alice", name="other-key")
    with pytest.raises(KeyCertificateMismatchError, match="not the private key"):
        sign_bundle(bundle, other.key, alice.cert, [pki.ca_pem])


def test_signer_refuses_non_owner_and_expired_certificates(bundle: Path, pki: Pki) -> None:
    auditor = pki.member("alice", "auditor")
    with pytest.raises(SignerCertificateError, match="auditor"):
        sign_bundle(bundle, auditor.key, auditor.cert)
    old = pki.member(
        "alice",
        name="old",
        not_before=now() - dt.timedelta(days=10),
        not_after=now() - dt.timedelta(days=1),
    )
    with pytest.raises(SignerCertificateError, match="expired"):
        sign_bundle(bundle, old.key, old.cert)


def test_signer_refuses_a_directory_with_other_files(bundle: Path, pki: Pki, alice: Member) -> None:
    (bundle / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match=r"notes\.txt"):
        sign_bundle(bundle, alice.key, alice.cert, [pki.ca_pem])


def test_sign_command(bundle: Path, pki: Pki, alice: Member, small_anchor: Anchor) -> None:
    args = [str(bundle), "--key", str(alice.key), "--cert", str(alice.cert)]
    result = CliRunner().invoke(sign, [*args, "--chain", str(pki.ca_pem)])
    assert result.exit_code == 0, result.output
    assert "signed" in result.output and "alice (owner" in result.output
    verifier(pki, small_anchor).verify(bundle)

    bob = pki.member("bob")
    result = CliRunner().invoke(sign, [str(bundle), "--key", str(bob.key), "--cert", str(bob.cert)])
    assert isinstance(result.exception, CertificateOrgMismatchError)
    assert isinstance(result.exception, InvalidInputError)
    assert result.exception.exit_code == 3


# --- third-party tools ---------------------------------------------------------------------


def model_signing_verify(bundle: Path, ca_pem: Path) -> subprocess.CompletedProcess[str]:
    """Exactly the auditor guide's step 1."""
    return subprocess.run(
        [
            str(MODEL_SIGNING),
            "verify",
            "certificate",
            str(bundle),
            "--signature",
            str(bundle / SIGNATURE),
            "--certificate_chain",
            str(ca_pem),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def openssl_verify(ca_pem: Path, crl_pem: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(OPENSSL),
            "verify",
            "-CAfile",
            str(ca_pem),
            "-crl_check",
            "-CRLfile",
            str(crl_pem),
            str(cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def auditor_script() -> str:
    """The bash block of docs/auditor-guide.md that auditors are told to run."""
    text = AUDITOR_GUIDE.read_text()
    match = re.search(r"<!-- audit-script:[^>]*-->\n```bash\n(.*?)\n```", text, re.S)
    assert match, "docs/auditor-guide.md lost its audit-script block"
    return match.group(1)


def run_auditor_script(
    tmp_path: Path, bundle: Path, ca_pem: Path, crl_pem: Path, anchor_digest: str
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "audit-expert.sh"
    script.write_text(auditor_script())
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "EXPERT": str(bundle),
        "CA": str(ca_pem),
        "CRL": str(crl_pem),
        "ANCHOR": anchor_digest,
    }
    return subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, env=env, check=False
    )


@needs_openssl
def test_third_party_tools_accept_a_good_bundle(
    signed: Path, pki: Pki, alice: Member, small_anchor: Anchor, tmp_path: Path
) -> None:
    ms = model_signing_verify(signed, pki.ca_pem)
    assert ms.returncode == 0 and "Verification succeeded" in ms.stdout, ms.stderr
    ossl = openssl_verify(pki.ca_pem, pki.crl_pem, alice.cert)
    assert ossl.returncode == 0 and ossl.stdout.strip().endswith(": OK"), ossl.stderr
    script = run_auditor_script(tmp_path, signed, pki.ca_pem, pki.crl_pem, small_anchor.digest)
    assert script.returncode == 0, script.stdout + script.stderr
    assert "Verified OK" in script.stdout  # openssl dgst on the provenance's DSSE PAE
    assert "FAILED" not in script.stdout and "verified: expert 'expert' of alice" in script.stdout


@needs_openssl
def test_third_party_tools_reject_a_flipped_weight_byte(
    signed: Path, pki: Pki, small_anchor: Anchor, tmp_path: Path
) -> None:
    flip_byte(signed / EXPERT_WEIGHTS, -1)
    ms = model_signing_verify(signed, pki.ca_pem)
    assert ms.returncode != 0
    assert "Verification failed" in ms.stderr and EXPERT_WEIGHTS in ms.stderr
    script = run_auditor_script(tmp_path, signed, pki.ca_pem, pki.crl_pem, small_anchor.digest)
    assert script.returncode != 0


@needs_openssl
def test_openssl_rejects_a_revoked_signer(signed: Path, pki: Pki, alice: Member) -> None:
    revoke(pki.ca_dir, alice.cert, "key-compromise")
    ossl = openssl_verify(pki.ca_pem, pki.crl_pem, alice.cert)
    assert ossl.returncode != 0 and "revoked" in ossl.stdout + ossl.stderr
    # ... which model_signing alone would not notice: the gap BundleVerifier closes.
    assert model_signing_verify(signed, pki.ca_pem).returncode == 0


# --- golden fixtures -----------------------------------------------------------------------


def golden_copy(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    bundle = tmp_path / "golden"
    shutil.copytree(GOLDEN / "bundle", bundle)
    return bundle, json.loads((GOLDEN / "expected.json").read_text())


def test_golden_bundle_keeps_verifying(tmp_path: Path) -> None:
    """Signatures made by the first release must verify in every later one (see README.txt)."""
    bundle, expected = golden_copy(tmp_path)
    at = dt.datetime.fromisoformat(expected["at"])
    result = BundleVerifier(
        GOLDEN / "ca.pem", GOLDEN / "crl.pem", expected["anchor_digest"], at
    ).verify(bundle)
    assert result.org == expected["org"] and result.role == expected["role"]
    assert result.expert_name == expected["expert_name"]
    assert result.cert_serial == expected["cert_serial"]
    assert result.cert_fingerprint == expected["cert_fingerprint"]
    assert dict(result.signed_files) == expected["signed_files"]
    assert result.manifest_digest == expected["manifest_digest"]
    assert result.weights_sha256 == expected["weights_sha256"]
    assert result.anchor_digest == expected["anchor_digest"]
    assert result.data_commitment == expected["data_commitment"]
    assert result.code_version == expected["code_version"]
    assert result.provenance.builder_id == expected["builder_id"]
    owner_der = load_certificate(GOLDEN / "owner.pem").public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(owner_der).hexdigest() == expected["cert_fingerprint"]
    assert model_signing_verify(bundle, GOLDEN / "ca.pem").returncode == 0


def test_golden_bundle_still_catches_tampering(tmp_path: Path) -> None:
    bundle, expected = golden_copy(tmp_path)
    flip_byte(bundle / EXPERT_WEIGHTS, -1)
    at = dt.datetime.fromisoformat(expected["at"])
    with pytest.raises(TamperedWeightsError):
        BundleVerifier(GOLDEN / "ca.pem", GOLDEN / "crl.pem", expected["anchor_digest"], at).verify(
            bundle
        )


def test_one_verifier_checks_bundles_signed_with_later_certificates(tmp_path: Path) -> None:
    """A coordinator reuses one verifier; certificates issued after its first check still pass."""
    import time as _time

    from conftest import make_expert_bundle

    from flexfed.common.trust.signing import BundleSigner, BundleVerifier

    anchor = build_anchor("olmo2", tmp_path / "anchor")
    ca = init_ca(tmp_path / "ca", "Test CA")
    verifier = BundleVerifier(ca.cert)
    for i, org in enumerate(["early", "late"]):
        req = generate_key_and_csr(org, tmp_path / f"keys-{org}")
        cert = issue_certificate(tmp_path / "ca", req.csr, "owner", out=tmp_path / f"{org}.pem")
        bundle = make_expert_bundle(anchor, tmp_path / f"b-{org}", org, seed=i + 1)
        BundleSigner(req.key, cert.path, [ca.cert]).sign(bundle)
        assert verifier.verify(bundle).org == org
        _time.sleep(1.1)  # the next certificate's notBefore is later than the first check


def test_train_with_sign_writes_a_verifying_bundle(tmp_path: Path) -> None:
    """`flexfed client train --sign` signs the bundle it writes; a wrong org is refused first."""
    import json
    import subprocess
    import sys

    from flexfed.common.trust.signing import BundleVerifier

    anchor = build_anchor("olmo2", tmp_path / "anchor")
    ca = init_ca(tmp_path / "ca", "Test CA")
    req = generate_key_and_csr("acme", tmp_path / "keys")
    cert = issue_certificate(tmp_path / "ca", req.csr, "owner", out=tmp_path / "acme.pem")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"{i}+{i}={2 * i}. " * 8}) + "\n" for i in range(60))
    )
    flexfed = str(Path(sys.executable).parent / "flexfed")

    def train(org: str, out: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [flexfed, "client", "train", "--public", str(anchor.path), "--data", str(data),
             "--org", org, "--out", str(tmp_path / out), "--max-steps", "2", "--seq-len", "32",
             "--batch-size", "2", "--sign", "--key", str(req.key), "--cert", str(cert.path),
             "--chain", str(ca.cert), "--quiet"],
            capture_output=True, text=True,
        )  # fmt: skip

    wrong = train("other-org", "wrong")
    assert wrong.returncode != 0 and "flexfed: error:" in wrong.stderr
    assert not (tmp_path / "wrong").exists()  # refused before training
    ok = train("acme", "expert")
    assert ok.returncode == 0, ok.stderr
    assert BundleVerifier(ca.cert, anchor=anchor).verify(tmp_path / "expert").org == "acme"
