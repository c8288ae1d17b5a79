"""Build provenance: a DSSE-signed in-toto Statement with a SLSA Provenance v1 predicate.

``provenance.intoto.json`` in an expert bundle says *who* built the weights (the org), *from
what* (the anchor digest, the data commitment, the flexfed version that trained them) and *how*
(the training summary), bound to the weights by their SHA-256 and signed with the owner's key.

The file is a DSSE JSON envelope (https://github.com/secure-systems-lab/dsse, v1.0.0)::

    {"payloadType": "application/vnd.in-toto+json",
     "payload": "<base64 of the Statement's JSON bytes>",
     "signatures": [{"keyid": "<SHA-256 of the signer certificate's DER, hex>",
                     "sig": "<base64 of the DER ECDSA P-256/SHA-256 signature over PAE>",
                     "certificate": "<the signer certificate, PEM>"}]}

The signature is over ``PAE(payloadType, payload)`` as the DSSE protocol defines it. DSSE lets
producers add fields and tells consumers to ignore the ones they do not know, so the signer's
certificate travels as the extra ``certificate`` field: a verifier checks it against the consortium
CA (:func:`flexfed.common.trust.pki.verify_chain`), and :mod:`flexfed.common.trust.signing` requires
it to be the very certificate that signed ``model.sig``. ``keyid`` is only a hint (DSSE forbids
basing decisions on it).

The Statement (https://in-toto.io/Statement/v1)::

    subject: [{"name": "expert.safetensors", "digest": {"sha256": <weights>}}]
    predicateType: https://slsa.dev/provenance/v1
    predicate.buildDefinition:
        buildType: flexfed://build-types/expert/v1
        externalParameters: {org, expert, family, shapes, training, license}  (= expert.json)
        resolvedDependencies:
            {uri: flexfed:anchor,          name: anchor,          digest: {sha256: <anchor>}}
            {uri: flexfed:data-commitment, name: data-commitment, digest: {sha256: <commitment>}}
            {uri: flexfed:code,            name: flexfed,         annotations: {version: <v>}}
    predicate.runDetails.builder: {id: flexfed://org/<org>, version: {flexfed: <signer's>}}

The code dependency carries the version that trained the expert (expert.json
``training.code_version``; ``unknown`` when absent) as an annotation and no digest: nothing a
verifier could recompute identifies the running code, and a digest of nothing would claim a
content that was never hashed. The builder id is the same URI as the certificate's SAN
``flexfed://org/<org>``.

No timestamps are claimed: the signer's clock proves nothing. Verifiers judge the certificate
at a time they trust (upload time, or the transparency log's).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common import __version__
from flexfed.common.errors import InvalidInputError, MissingFileError, VerificationError
from flexfed.common.formats.bundle import (
    EXPERT_WEIGHTS,
    MAX_ATTESTATION_BYTES,
    PROVENANCE,
    ExpertMeta,
    read_expert_meta,
)
from flexfed.common.trust.pki import ORG_URI_PREFIX, fingerprint
from flexfed.common.util.digest import sha256_file
from flexfed.common.util.fs import atomic_write_bytes
from flexfed.common.util.jsonio import StrictJSONError, loads_strict

logger = logging.getLogger(__name__)

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "flexfed://build-types/expert/v1"
ANCHOR_URI = "flexfed:anchor"
DATA_COMMITMENT_URI = "flexfed:data-commitment"
CODE_URI = "flexfed:code"
UNKNOWN_VERSION = "unknown"


# --- errors --------------------------------------------------------------------------------


class ProvenanceError(VerificationError):
    """``provenance.intoto.json`` does not verify or does not describe this expert."""


class MissingProvenanceError(ProvenanceError, FileNotFoundError):
    """The bundle has no ``provenance.intoto.json``."""


class MalformedProvenanceError(ProvenanceError):
    """The provenance is not a DSSE envelope over an in-toto SLSA v1 Statement of ours."""


class ProvenanceSignatureError(ProvenanceError):
    """The DSSE signature does not verify with the certificate the envelope carries."""


class ProvenanceSignerMismatchError(ProvenanceError):
    """The provenance was signed with another certificate than the one it must come from."""


class ProvenanceSubjectError(ProvenanceError):
    """The provenance is about other weights than the bundle's ``expert.safetensors``."""


class ProvenanceDependencyError(ProvenanceError):
    """The anchor, data commitment or code version in the provenance differ from expert.json."""


class ProvenanceBuilderError(ProvenanceError):
    """The builder (org) or build parameters in the provenance differ from expert.json."""


class ProvenanceSigningError(InvalidInputError):
    """The key or certificate given to the provenance signer cannot sign (a usage error)."""


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedStatement:
    """What :func:`open_envelope` verified: the Statement and the certificate that signed it."""

    statement: dict[str, Any]
    certificate: x509.Certificate
    keyid: str


@dataclass(frozen=True)
class VerifiedProvenance:
    """What :meth:`ProvenanceVerifier.verify` verified, in short."""

    subject_name: str
    subject_sha256: str
    builder_id: str
    build_type: str
    anchor_digest: str
    data_commitment: str
    code_version: str
    signer_fingerprint: str
    external_parameters: dict[str, Any] = field(repr=False)
    statement: dict[str, Any] = field(repr=False)


# --- the format ----------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature is computed over.

    ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body``, lengths as ASCII decimal byte
    counts.
    """
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def code_version_of(meta: ExpertMeta) -> str:
    """The flexfed version that trained an expert, as its provenance records it."""
    version = meta.training.get("code_version")
    return str(version) if version not in (None, "") else UNKNOWN_VERSION


def builder_id(org: str) -> str:
    """The SLSA builder id of an org: the same URI as its certificate's SAN."""
    return ORG_URI_PREFIX + org


def external_parameters(meta: ExpertMeta) -> dict[str, Any]:
    """The SLSA externalParameters of an expert: what its owner chose, copied from expert.json."""
    return {
        "org": meta.org,
        "expert": meta.name,
        "family": meta.family,
        "shapes": meta.shapes.to_json(),
        "training": meta.training,
        "license": meta.license,
    }


def resolved_dependencies(meta: ExpertMeta) -> list[dict[str, Any]]:
    """The SLSA resolvedDependencies of an expert: anchor, data commitment, code version."""
    return [
        {"uri": ANCHOR_URI, "name": "anchor", "digest": {"sha256": meta.anchor_digest}},
        {
            "uri": DATA_COMMITMENT_URI,
            "name": "data-commitment",
            "digest": {"sha256": meta.data_commitment},
        },
        {"uri": CODE_URI, "name": "flexfed", "annotations": {"version": code_version_of(meta)}},
    ]


def build_statement(meta: ExpertMeta, weights_sha256: str) -> dict[str, Any]:
    """The in-toto Statement (SLSA Provenance v1) for an expert whose weights hash so."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": EXPERT_WEIGHTS, "digest": {"sha256": weights_sha256}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external_parameters(meta),
                "resolvedDependencies": resolved_dependencies(meta),
            },
            "runDetails": {
                "builder": {"id": builder_id(meta.org), "version": {"flexfed": __version__}},
            },
        },
    }


def _b64decode(text: Any, what: str) -> bytes:
    """Decode standard or URL-safe base64 (DSSE allows both), strictly."""
    if not isinstance(text, str):
        raise MalformedProvenanceError(f"provenance {what} must be a base64 string")
    std = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(std + "=" * (-len(std) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedProvenanceError(f"provenance {what} is not valid base64") from None


def _loads(data: bytes, what: str) -> Any:
    """Parse JSON strictly (no duplicate keys, no NaN): one meaning for every verifier."""
    try:
        return loads_strict(data)
    except StrictJSONError as err:
        if err.kind in ("syntax", "depth"):
            raise MalformedProvenanceError(f"{what} is not valid UTF-8 JSON: {err}") from err
        raise MalformedProvenanceError(f"provenance JSON {err}") from err


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_envelope(
    statement: Mapping[str, Any], key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> dict[str, Any]:
    """Sign a Statement into a DSSE envelope (ECDSA P-256 SHA-256) that carries ``cert``."""
    if key.public_key() != cert.public_key():
        raise ProvenanceSigningError("the private key does not belong to the signing certificate")
    payload = _dumps(statement)
    sig = key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {
                "keyid": fingerprint(cert),
                "sig": base64.b64encode(sig).decode("ascii"),
                "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            }
        ],
    }


def open_envelope(envelope: Any) -> SignedStatement:
    """Verify a DSSE envelope's signature with the certificate it carries; parse the Statement.

    Recomputes PAE from ``payloadType`` and the decoded payload and checks the ECDSA
    signature. Does *not* decide whether the certificate is trusted: check it against the CA
    (:func:`flexfed.common.trust.pki.verify_chain`) or compare it with the one expected.
    """
    if not isinstance(envelope, dict):
        raise MalformedProvenanceError("provenance must be a JSON object (a DSSE envelope)")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise MalformedProvenanceError(
            f"provenance payloadType must be {PAYLOAD_TYPE!r}, got {envelope.get('payloadType')!r}"
        )
    payload = _b64decode(envelope.get("payload"), "payload")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or len(signatures) != 1:
        raise MalformedProvenanceError("provenance must carry exactly one signature")
    entry = signatures[0]
    if not isinstance(entry, dict):
        raise MalformedProvenanceError("provenance signature must be a JSON object")
    sig = _b64decode(entry.get("sig"), "signature")
    pem = entry.get("certificate")
    if not isinstance(pem, str):
        raise MalformedProvenanceError("provenance signature carries no signer certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as err:
        raise MalformedProvenanceError(
            f"provenance signer certificate is unreadable: {err}"
        ) from err
    public_key = cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise ProvenanceSignatureError("provenance signer certificate is not for a P-256 key")
    try:
        public_key.verify(sig, pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        raise ProvenanceSignatureError(
            "provenance signature does not verify: the provenance was altered after signing"
        ) from None
    statement = _loads(payload, "provenance payload")
    if not isinstance(statement, dict):
        raise MalformedProvenanceError("provenance payload must be a JSON object")
    keyid = entry.get("keyid", "")
    return SignedStatement(statement, cert, keyid if isinstance(keyid, str) else "")


def read_envelope(path: Path) -> Any:
    """Read a provenance file (size-limited, strict JSON); no signature check."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise MissingProvenanceError(
            f"{path} is missing: sign the bundle with `flexfed client sign`"
        ) from None
    if size > MAX_ATTESTATION_BYTES:
        raise MalformedProvenanceError(
            f"{path.name} is {size} bytes; at most {MAX_ATTESTATION_BYTES} are allowed"
        )
    return _loads(path.read_bytes(), path.name)


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise InvalidInputError(f"cannot write {path}: {err.strerror or err}") from err


# --- signer and verifier -------------------------------------------------------------------


class ProvenanceSigner:
    """Writes ``provenance.intoto.json`` for a bundle, signed with the owner's key.

    Low-level: it checks that the key belongs to the certificate, not who the certificate
    names (:class:`flexfed.common.trust.signing.BundleSigner` does that before calling it).
    """

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        if key.public_key() != cert.public_key():
            raise ProvenanceSigningError(
                "the private key does not belong to the signing certificate"
            )
        self.key = key
        self.cert = cert

    def sign(
        self,
        bundle_dir: Path | str,
        meta: ExpertMeta | None = None,
        *,
        weights_sha256: str | None = None,
    ) -> Path:
        """Write the bundle's provenance; return its path.

        ``meta`` defaults to the bundle's expert.json and ``weights_sha256`` to the digest of
        its expert.safetensors.
        """
        bundle = Path(bundle_dir)
        if meta is None:
            meta = read_expert_meta(bundle / "expert.json")
        if weights_sha256 is None:
            weights = bundle / EXPERT_WEIGHTS
            if not weights.is_file():
                raise MissingFileError(f"{weights} is missing; nothing to sign")
            weights_sha256 = sha256_file(weights)
        envelope = sign_envelope(build_statement(meta, weights_sha256), self.key, self.cert)
        out = bundle / PROVENANCE
        _write_atomic(out, (json.dumps(envelope, indent=2, sort_keys=True) + "\n").encode())
        logger.info("wrote %s (subject %s)", out, weights_sha256[:16])
        return out


def _dependency(deps: list[Any], uri: str) -> dict[str, Any]:
    found = [d for d in deps if isinstance(d, dict) and d.get("uri") == uri]
    if len(found) != 1:
        raise ProvenanceDependencyError(
            f"provenance must list the dependency {uri!r} exactly once; it lists it {len(found)} "
            "time(s)"
        )
    return found[0]


def _sha256_of(dep: Mapping[str, Any]) -> Any:
    digest = dep.get("digest")
    return digest.get("sha256") if isinstance(digest, dict) else None


class ProvenanceVerifier:
    """Verifies a bundle's provenance against the certificate that must have signed it.

    ``certificate`` is already trusted by the caller (for a bundle: the chain-verified signer
    of ``model.sig``); :meth:`verify` requires the envelope to carry exactly that certificate.
    """

    def __init__(self, certificate: x509.Certificate) -> None:
        self.certificate = certificate

    def verify(self, path: Path | str, meta: ExpertMeta, weights_sha256: str) -> VerifiedProvenance:
        """Verify signature, signer, subject, dependencies and builder; return the summary.

        Raises a distinct :class:`ProvenanceError` subclass for each failure.
        """
        path = Path(path)
        signed = open_envelope(read_envelope(path))
        if signed.certificate != self.certificate:
            raise ProvenanceSignerMismatchError(
                f"{path.name} was signed with certificate {fingerprint(signed.certificate)[:16]}..."
                f", not with the certificate that signed model.sig "
                f"({fingerprint(self.certificate)[:16]}...)"
            )
        st = signed.statement
        if st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != PREDICATE_TYPE:
            raise MalformedProvenanceError(
                f"{path.name} is not an in-toto Statement v1 with a SLSA Provenance v1 predicate"
            )
        subjects = st.get("subject")
        want_subject = [{"name": EXPERT_WEIGHTS, "digest": {"sha256": weights_sha256}}]
        if subjects != want_subject:
            got = subjects[0] if isinstance(subjects, list) and len(subjects) == 1 else subjects
            got_digest = _sha256_of(got) if isinstance(got, dict) else None
            raise ProvenanceSubjectError(
                f"{path.name} is about other weights (subject {str(got_digest)[:16]}...) than "
                f"this bundle's {EXPERT_WEIGHTS} ({weights_sha256[:16]}...)"
            )
        predicate = st.get("predicate")
        build = predicate.get("buildDefinition") if isinstance(predicate, dict) else None
        run = predicate.get("runDetails") if isinstance(predicate, dict) else None
        builder = run.get("builder") if isinstance(run, dict) else None
        if (
            not isinstance(build, dict)
            or not isinstance(builder, dict)
            or build.get("buildType") != BUILD_TYPE
            or not isinstance(build.get("resolvedDependencies"), list)
        ):
            raise MalformedProvenanceError(
                f"{path.name} has no flexfed buildDefinition ({BUILD_TYPE}) and runDetails.builder"
            )

        deps = build["resolvedDependencies"]
        anchor = _sha256_of(_dependency(deps, ANCHOR_URI))
        commitment = _sha256_of(_dependency(deps, DATA_COMMITMENT_URI))
        code = _dependency(deps, CODE_URI).get("annotations")
        version = code.get("version") if isinstance(code, dict) else None
        if len(deps) != 3:
            raise ProvenanceDependencyError(
                f"{path.name} lists {len(deps)} dependencies; an expert has exactly three "
                "(anchor, data commitment, code)"
            )
        for what, got, want in (
            ("anchor digest", anchor, meta.anchor_digest),
            ("data commitment", commitment, meta.data_commitment),
            ("code version", version, code_version_of(meta)),
        ):
            if got != want:
                raise ProvenanceDependencyError(
                    f"{path.name} names {what} {str(got)[:16]!r}, but expert.json says "
                    f"{want[:16]!r}"
                )

        if builder.get("id") != builder_id(meta.org):
            raise ProvenanceBuilderError(
                f"{path.name} says the builder was {builder.get('id')!r}, but expert.json's org "
                f"is {meta.org!r} ({builder_id(meta.org)})"
            )
        params = build.get("externalParameters")
        if params != external_parameters(meta):
            raise ProvenanceBuilderError(
                f"{path.name}'s build parameters (org, expert, family, shapes, training, "
                "license) differ from expert.json: it was made for another expert"
            )
        return VerifiedProvenance(
            subject_name=EXPERT_WEIGHTS,
            subject_sha256=weights_sha256,
            builder_id=builder["id"],
            build_type=BUILD_TYPE,
            anchor_digest=anchor,
            data_commitment=commitment,
            code_version=code_version_of(meta),
            signer_fingerprint=fingerprint(signed.certificate),
            external_parameters=params,
            statement=st,
        )
