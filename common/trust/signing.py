"""Signed expert bundles: ``model.sig`` and ``provenance.intoto.json``, made and verified.

:class:`BundleSigner` signs a bundle with a data owner's P-256 key and consortium certificate:

1. ``provenance.intoto.json`` (:mod:`flexfed.common.trust.provenance`): a DSSE-signed SLSA v1
   provenance whose subject is the SHA-256 of ``expert.safetensors``;
2. ``model.sig``: an OpenSSF model-signing (OMS) bundle made by the ``model_signing``
   package's certificate signer, per-file ("files") SHA-256 serialization, over exactly
   ``expert.json`` and ``expert.safetensors``; the leaf certificate and the chain ride inside.

``model.sig`` deliberately covers neither itself nor the provenance: its signed manifest
records both as ignored paths, so any OMS verifier (``model_signing verify certificate``)
checks the two content files and nothing else, and the provenance (signed separately, by the
same certificate) can be regenerated without touching the weights' signature. Anything else in
the directory makes verification fail.

:class:`BundleVerifier` checks, in this order, and raises a distinct
:class:`~flexfed.common.errors.VerificationError` subclass at the first failure:

1. the directory holds only bundle files, plain, within size limits;
2. ``model.sig`` parses and carries a certificate chain;
3. the signer certificate chains to the consortium CA, is valid at ``at``, is an owner's, and
   (with a CRL) is not revoked: :func:`flexfed.common.trust.pki.verify_chain` (model-signing checks
   the chain only at the certificate's notBefore and knows neither CRLs nor roles);
4. the OMS signature verifies (model-signing's certificate verifier, our CA as the only root);
5. the signed manifest is per-file SHA-256 over exactly expert.json and expert.safetensors,
   and both files hash to what was signed;
6. expert.json (only now parsed: it is authenticated) names the signer's org, and the
   expected anchor;
7. the provenance: same certificate, DSSE signature, subject = the weights' SHA-256,
   dependencies and builder = expert.json's;
8. with an :class:`~flexfed.common.formats.anchor.Anchor`: the strict structural validation
   (:func:`flexfed.common.formats.bundle.validate_bundle`).

``at`` is the time at which certificate validity and revocation are judged. An OMS bundle
carries no trusted timestamp, so this is the verifier's to choose: now at upload (the
coordinator), the transparency log's acceptance time for an audit later.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import (
    BundleError,
    ConfigError,
    DigestMismatchError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.formats.bundle import (
    BUNDLE_FILES,
    EXPERT_META,
    EXPERT_WEIGHTS,
    MAX_ATTESTATION_BYTES,
    MAX_META_BYTES,
    PROVENANCE,
    SIGNATURE,
    ExpertBundle,
    ExpertMeta,
    read_expert_meta,
    validate_bundle,
)
from flexfed.common.trust.pki import (
    CLOCK_SKEW,
    Identity,
    PathLike,
    identity_of,
    load_certificate,
    load_crl,
    verify_chain,
)
from flexfed.common.trust.provenance import (
    MalformedProvenanceError,
    MissingProvenanceError,
    ProvenanceBuilderError,
    ProvenanceDependencyError,
    ProvenanceError,
    ProvenanceSignatureError,
    ProvenanceSigner,
    ProvenanceSignerMismatchError,
    ProvenanceSubjectError,
    ProvenanceVerifier,
    VerifiedProvenance,
)
from flexfed.common.util.clock import as_utc, utc_now
from flexfed.common.util.digest import manifest_digest, sha256_file

if TYPE_CHECKING:
    from flexfed.common.formats.anchor import Anchor

__all__ = [
    "SIGNED_FILES",
    "AnchorDigestMismatchError",
    "BundleSignatureError",
    "BundleSigner",
    "BundleVerificationError",
    "BundleVerifier",
    "CertificateOrgMismatchError",
    "KeyCertificateMismatchError",
    "MalformedProvenanceError",
    "MalformedSignatureError",
    "MissingProvenanceError",
    "MissingSignatureError",
    "ProvenanceBuilderError",
    "ProvenanceDependencyError",
    "ProvenanceError",
    "ProvenanceSignatureError",
    "ProvenanceSignerMismatchError",
    "ProvenanceSubjectError",
    "SignedBundle",
    "SignedFilesMismatchError",
    "SignerCertificateError",
    "SignerOrgMismatchError",
    "SigningInputError",
    "TamperedFileError",
    "TamperedMetadataError",
    "TamperedWeightsError",
    "UnexpectedFileError",
    "VerifiedBundle",
]

logger = logging.getLogger(__name__)

#: What ``model.sig`` covers, in the manifest's (sorted) order.
SIGNED_FILES: tuple[str, ...] = (EXPERT_META, EXPERT_WEIGHTS)
#: Recorded as ignored in the signed manifest, so OMS verifiers skip them.
UNSIGNED_FILES: tuple[str, ...] = (SIGNATURE, PROVENANCE)


# --- errors: verification ------------------------------------------------------------------


class BundleVerificationError(VerificationError):
    """An expert bundle's signature does not verify or does not vouch for this bundle."""


class MissingSignatureError(BundleVerificationError, FileNotFoundError):
    """The bundle has no ``model.sig``: it was never signed."""


class UnexpectedFileError(BundleVerificationError):
    """The bundle holds a file no signature covers, or one that is not a plain file."""


class MalformedSignatureError(BundleVerificationError):
    """``model.sig`` is not an OpenSSF model-signing bundle made with a certificate."""


class BundleSignatureError(BundleVerificationError):
    """The signature in ``model.sig`` does not verify (model-signing rejects it)."""


class SignedFilesMismatchError(BundleVerificationError):
    """``model.sig`` signs other files (or another serialization) than an expert bundle's."""


class TamperedFileError(BundleVerificationError, DigestMismatchError):
    """A signed file does not hash to its signed digest: it changed after signing."""


class TamperedWeightsError(TamperedFileError):
    """``expert.safetensors`` changed after signing."""


class TamperedMetadataError(TamperedFileError):
    """``expert.json`` changed after signing."""


class SignerOrgMismatchError(BundleVerificationError):
    """The signer's certificate is for another organisation than expert.json names."""


class AnchorDigestMismatchError(BundleVerificationError):
    """The signed expert was trained on another anchor than the one expected."""


# --- errors: signing (usage) ---------------------------------------------------------------


class SigningInputError(InvalidInputError):
    """The key, certificate or bundle given to the signer cannot make a valid signature."""


class KeyCertificateMismatchError(SigningInputError):
    """The private key is not the one the certificate certifies."""


class CertificateOrgMismatchError(SigningInputError):
    """The certificate is for another organisation than the bundle's expert.json."""


class SignerCertificateError(SigningInputError):
    """The certificate cannot sign expert bundles (not an owner's, expired, not yet valid)."""


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignedBundle:
    """What :meth:`BundleSigner.sign` wrote."""

    path: Path
    signature: Path
    provenance: Path
    identity: Identity
    signed_files: Mapping[str, str]  # name -> hex SHA-256

    @property
    def weights_sha256(self) -> str:
        return self.signed_files[EXPERT_WEIGHTS]


@dataclass(frozen=True)
class VerifiedBundle:
    """What :meth:`BundleVerifier.verify` verified: who signed which bytes, from what."""

    path: Path
    org: str
    role: str
    expert_name: str
    cert_serial: str  # hex, as OpenSSL prints it
    cert_fingerprint: str  # SHA-256 of the DER certificate, hex
    signed_files: Mapping[str, str]  # name -> hex SHA-256, exactly SIGNED_FILES
    manifest_digest: str  # the OMS root digest (subject of model.sig's statement)
    weights_sha256: str
    anchor_digest: str
    data_commitment: str
    code_version: str
    provenance: VerifiedProvenance
    identity: Identity
    meta: ExpertMeta = field(repr=False)
    verified_at: dt.datetime = field(repr=False)
    validated: ExpertBundle | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return (
            f"{self.path.name}: expert {self.expert_name!r} of {self.org}, signed by "
            f"{self.identity}, weights {self.weights_sha256[:16]}..., anchor "
            f"{self.anchor_digest[:16]}..."
        )


# --- helpers -------------------------------------------------------------------------------


def load_private_key(path: PathLike) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted PEM ECDSA private key (what ``flexfed client keygen`` writes)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"private key not found: {path}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningInputError(
            f"{path} is encrypted; model-signing's certificate signer needs an unencrypted key "
            "(keep it on the signing machine, mode 0600)"
        ) from None
    except ValueError as err:
        raise SigningInputError(f"{path} is not a PEM private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise SigningInputError(f"{path} is not an ECDSA P-256 key; make one with keygen")
    return key


def _load_chain(paths: Iterable[PathLike]) -> list[x509.Certificate]:
    out: list[x509.Certificate] = []
    for p in paths:
        path = Path(p)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingFileError(f"certificate chain file not found: {path}") from None
        try:
            out.extend(x509.load_pem_x509_certificates(data))
        except ValueError as err:
            raise SigningInputError(f"{path} is not a PEM certificate file: {err}") from err
    return out


def _bundle_contents(bundle: Path) -> dict[str, int]:
    """Names and sizes of a bundle's entries; only plain bundle files are allowed."""
    if not bundle.is_dir():
        raise MissingFileError(f"expert bundle not found: {bundle} is not a directory")
    sizes: dict[str, int] = {}
    for entry in sorted(bundle.iterdir()):
        if entry.name not in BUNDLE_FILES:
            raise UnexpectedFileError(
                f"{bundle}: {entry.name} is not part of an expert bundle and no signature covers "
                f"it; remove it (a bundle holds only {', '.join(sorted(BUNDLE_FILES))})"
            )
        st = entry.lstat()
        if not stat.S_ISREG(st.st_mode):
            raise UnexpectedFileError(
                f"{bundle}: {entry.name} is not a plain file (a link, folder or device)"
            )
        sizes[entry.name] = st.st_size
    return sizes


# NOTE: model_signing's public `verifying.Config.verify` raises one ValueError for every
# failure and hashes the files itself. We call the same two steps it does (the certificate
# verifier's `verify(signature) -> Manifest`, then compare with the files' hashes) so each
# failure gets its own error class and the weights are hashed once. These are model-signing
# 1.1's internal modules: the dependency is pinned to 1.1.x, and the golden fixtures plus the
# test that runs the `model_signing` CLI catch any drift.
def _oms_modules() -> tuple[Any, Any]:
    from model_signing._signing import sign_certificate, sign_sigstore_pb

    return sign_certificate, sign_sigstore_pb


# --- signing -------------------------------------------------------------------------------


class BundleSigner:
    """Signs expert bundles with a data owner's key and consortium certificate.

    ``chain_paths`` are PEM files of certificates to ship in ``model.sig`` after the signer's
    (usually the CA's ``ca.pem``); when one of them issued the certificate, :meth:`sign` also
    checks the certificate against it first.
    """

    def __init__(
        self, key_path: PathLike, cert_path: PathLike, chain_paths: Iterable[PathLike] = ()
    ) -> None:
        self.key_path = Path(key_path)
        self.cert_path = Path(cert_path)
        self.chain_paths = tuple(Path(p) for p in chain_paths)
        self.key = load_private_key(self.key_path)
        self.cert = load_certificate(self.cert_path)
        if self.key.public_key() != self.cert.public_key():
            raise KeyCertificateMismatchError(
                f"{self.key_path} is not the private key of {self.cert_path}: use the key you "
                "made the certificate request with"
            )
        self.chain = _load_chain(self.chain_paths)
        self.identity = identity_of(self.cert)
        if self.identity.role != "owner":
            raise SignerCertificateError(
                f"{self.cert_path} is an {self.identity.role} certificate; only data owners' "
                "(role owner) sign expert bundles"
            )
        self.issuer = next((c for c in self.chain if c.subject == self.cert.issuer), None)

    def check_certificate(self, at: dt.datetime | None = None) -> Identity:
        """Refuse a certificate that verifiers would refuse at ``at`` (default now)."""
        when = as_utc(at) if at is not None else utc_now()
        nb, na = self.cert.not_valid_before_utc, self.cert.not_valid_after_utc
        if when > na:
            raise SignerCertificateError(
                f"{self.cert_path} expired on {na:%Y-%m-%d %H:%M} UTC; ask the consortium "
                "operator for a new certificate"
            )
        if when + CLOCK_SKEW < nb:
            raise SignerCertificateError(
                f"{self.cert_path} is not valid before {nb:%Y-%m-%d %H:%M} UTC (check this "
                "machine's clock)"
            )
        if self.issuer is not None:
            return verify_chain(self.cert, self.issuer, max(when, nb), roles=("owner",))
        return self.identity

    def sign(self, bundle_dir: PathLike, *, at: dt.datetime | None = None) -> SignedBundle:
        """Write ``provenance.intoto.json``, then ``model.sig``; replace earlier ones.

        Refuses (:class:`SigningInputError`) a certificate for another org than expert.json's,
        an expired one, and a directory holding anything but the bundle files.
        """
        bundle = Path(bundle_dir)
        identity = self.check_certificate(at)
        try:
            present = _bundle_contents(bundle)
        except UnexpectedFileError as err:
            raise BundleError(str(err)) from None
        for name in SIGNED_FILES:
            if name not in present:
                raise MissingFileError(f"{bundle}: {name} is missing; nothing to sign")
        meta = read_expert_meta(bundle / EXPERT_META)
        if meta.org != identity.org:
            raise CertificateOrgMismatchError(
                f"{self.cert_path} certifies org {identity.org!r} but {bundle / EXPERT_META} is "
                f"for org {meta.org!r}; sign with the key and certificate of {meta.org!r}, or "
                f"retrain with --org {identity.org}"
            )
        digests = {name: sha256_file(bundle / name) for name in SIGNED_FILES}
        provenance = ProvenanceSigner(self.key, self.cert).sign(
            bundle, meta, weights_sha256=digests[EXPERT_WEIGHTS]
        )
        signature = self._write_model_sig(bundle)
        logger.info("signed %s as %s", bundle, identity)
        return SignedBundle(bundle, signature, provenance, identity, digests)

    def _write_model_sig(self, bundle: Path) -> Path:
        import model_signing.hashing
        import model_signing.signing

        hashing = (
            model_signing.hashing.Config()  # type: ignore[no-untyped-call]
            .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=list(UNSIGNED_FILES), ignore_git_paths=False)
        )
        config = (
            model_signing.signing.Config()  # type: ignore[no-untyped-call]
            .use_certificate_signer(
                private_key=self.key_path,
                signing_certificate=self.cert_path,
                certificate_chain=self.chain_paths,
            )
            .set_hashing_config(hashing)
        )
        out = bundle / SIGNATURE
        # NOTE: written beside the bundle, then moved in: a temporary file inside it would be
        # hashed into the manifest, and a half-written model.sig must never be visible.
        try:
            with tempfile.TemporaryDirectory(dir=bundle.resolve().parent, prefix=".sign-") as tmp:
                staged = Path(tmp) / SIGNATURE
                config.sign(bundle, staged)
                os.replace(staged, out)
        except OSError as err:
            raise InvalidInputError(f"cannot write {out}: {err.strerror or err}") from err
        return out


# --- verifying -----------------------------------------------------------------------------


class BundleVerifier:
    """Verifies signed expert bundles against the consortium CA (see the module docstring).

    ``ca_cert`` and ``crl`` are loaded objects or file paths. ``at`` fixes the time at which
    certificates are judged (default: the moment of each :meth:`verify`). With ``anchor``, the
    expected anchor digest is the anchor's and the bundle is also validated structurally.
    """

    def __init__(
        self,
        ca_cert: x509.Certificate | PathLike,
        crl: x509.CertificateRevocationList | PathLike | None = None,
        expected_anchor_digest: str | None = None,
        at: dt.datetime | None = None,
        *,
        anchor: Anchor | None = None,
        crl_fresh_at: dt.datetime | None = None,
    ) -> None:
        self.ca_cert = (
            ca_cert if isinstance(ca_cert, x509.Certificate) else load_certificate(ca_cert)
        )
        self.crl = (
            crl if crl is None or isinstance(crl, x509.CertificateRevocationList) else load_crl(crl)
        )
        self.anchor = anchor
        if anchor is not None:
            digest = anchor.digest
            if expected_anchor_digest not in (None, digest):
                raise ConfigError(
                    "expected_anchor_digest differs from the anchor's digest; give one of them"
                )
            expected_anchor_digest = digest
        self.expected_anchor_digest = expected_anchor_digest
        self.at = as_utc(at) if at is not None else None
        # when the CRL must be current (default: ``at``); see pki.verify_chain
        self.crl_fresh_at = as_utc(crl_fresh_at) if crl_fresh_at is not None else None
        self._ca_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM)
        # NOTE: model-signing's verifier sets its OpenSSL store's time from the first leaf it
        # checks and keeps it, so a reused verifier rejects later-issued certificates as "not
        # yet valid". A fresh one per verification; the lock keeps threads from sharing one.
        self._oms_lock = threading.Lock()

    def _new_oms_verifier(self) -> Any:
        sign_certificate, _ = _oms_modules()
        # model-signing's verifier reads its trust roots from files.
        with tempfile.TemporaryDirectory(prefix="flexfed-ca-") as tmp:
            root = Path(tmp) / "ca.pem"
            root.write_bytes(self._ca_pem)
            return sign_certificate.Verifier([root])

    def verify(self, bundle_dir: PathLike) -> VerifiedBundle:
        """Verify one expert bundle; return what was verified or raise at the first failure."""
        bundle = Path(bundle_dir)
        at = self.at or utc_now()
        sizes = _bundle_contents(bundle)
        if SIGNATURE not in sizes:
            raise MissingSignatureError(
                f"{bundle} has no {SIGNATURE}: sign it with `flexfed client sign`"
            )
        signature, leaf = self._read_signature(bundle / SIGNATURE, sizes[SIGNATURE])
        identity = verify_chain(
            leaf, self.ca_cert, at, self.crl, roles=("owner",), crl_fresh_at=self.crl_fresh_at
        )
        manifest = self._verify_oms(signature)
        signed = self._signed_digests(manifest)
        actual = self._check_files(bundle, signed, sizes)

        meta = read_expert_meta(bundle / EXPERT_META)
        if meta.org != identity.org:
            raise SignerOrgMismatchError(
                f"{bundle.name}: expert.json names org {meta.org!r} but model.sig was signed by "
                f"{identity}: an owner can only sign its own experts"
            )
        if (
            self.expected_anchor_digest is not None
            and meta.anchor_digest != self.expected_anchor_digest
        ):
            raise AnchorDigestMismatchError(
                f"{bundle.name} was trained on anchor {meta.anchor_digest[:16]}..., not the "
                f"consortium's {self.expected_anchor_digest[:16]}..."
            )
        provenance = ProvenanceVerifier(leaf).verify(
            bundle / PROVENANCE, meta, actual[EXPERT_WEIGHTS]
        )
        validated = validate_bundle(bundle, self.anchor) if self.anchor is not None else None
        return VerifiedBundle(
            path=bundle,
            org=identity.org,
            role=identity.role,
            expert_name=meta.name,
            cert_serial=identity.serial_hex,
            cert_fingerprint=identity.fingerprint,
            signed_files=dict(signed),
            manifest_digest=manifest_digest(signed),
            weights_sha256=actual[EXPERT_WEIGHTS],
            anchor_digest=meta.anchor_digest,
            data_commitment=meta.data_commitment,
            code_version=provenance.code_version,
            provenance=provenance,
            identity=identity,
            meta=meta,
            verified_at=at,
            validated=validated,
        )

    def _read_signature(self, path: Path, size: int) -> tuple[Any, x509.Certificate]:
        if size > MAX_ATTESTATION_BYTES:
            raise MalformedSignatureError(
                f"{path.name} is {size} bytes; a valid one is at most {MAX_ATTESTATION_BYTES}"
            )
        _, sign_sigstore_pb = _oms_modules()
        # NOTE: model-signing's reader raises whatever its JSON and pydantic layers raise.
        try:
            signature = sign_sigstore_pb.Signature.read(path)
            chain = signature.bundle.verification_material.x509_certificate_chain
            raw = chain.certificates[0].raw_bytes if chain is not None else None
        except Exception as err:
            raise MalformedSignatureError(
                f"{path.name} is not an OpenSSF model-signing bundle: {err}"
            ) from err
        if not raw:
            raise MalformedSignatureError(
                f"{path.name} carries no certificate chain: it was not made with a certificate "
                "(`flexfed client sign` or `model_signing sign certificate`)"
            )
        try:
            return signature, x509.load_der_x509_certificate(bytes(raw))
        except ValueError as err:
            raise MalformedSignatureError(
                f"{path.name}: the signer certificate is unreadable: {err}"
            ) from err

    def _verify_oms(self, signature: Any) -> Any:
        from OpenSSL import crypto

        try:
            with self._oms_lock:
                return self._new_oms_verifier().verify(signature)
        except InvalidSignature:
            raise BundleSignatureError(
                f"the signature in {SIGNATURE} does not verify: its signed manifest was altered"
            ) from None
        except crypto.X509StoreContextError as err:
            raise BundleSignatureError(
                f"model-signing does not accept the certificate chain in {SIGNATURE}: {err}"
            ) from err
        except Exception as err:  # a signed payload that is not an OMS manifest
            raise MalformedSignatureError(
                f"{SIGNATURE} does not hold a model-signing manifest: {err}"
            ) from err

    def _signed_digests(self, manifest: Any) -> dict[str, str]:
        params = manifest.serialization_type
        if params.get("method") != "files" or params.get("hash_type") != "sha256":
            raise SignedFilesMismatchError(
                f"{SIGNATURE} uses serialization {params.get('method')!r}/"
                f"{params.get('hash_type')!r}; expert bundles are signed per file with sha256"
            )
        signed = {rd.identifier: rd.digest for rd in manifest.resource_descriptors()}
        if set(signed) != set(SIGNED_FILES) or any(
            d.algorithm != "sha256" for d in signed.values()
        ):
            raise SignedFilesMismatchError(
                f"{SIGNATURE} covers {', '.join(sorted(signed)) or 'nothing'}; an expert "
                f"bundle's must cover exactly {', '.join(SIGNED_FILES)}"
            )
        return {name: signed[name].digest_hex for name in SIGNED_FILES}

    def _check_files(
        self, bundle: Path, signed: Mapping[str, str], sizes: Mapping[str, int]
    ) -> dict[str, str]:
        errors = {EXPERT_WEIGHTS: TamperedWeightsError, EXPERT_META: TamperedMetadataError}
        actual: dict[str, str] = {}
        for name in SIGNED_FILES:
            if name not in sizes:
                raise errors[name](f"{bundle.name}: {name} is signed but missing")
            if name == EXPERT_META and sizes[name] > MAX_META_BYTES:
                raise errors[name](f"{bundle.name}: {name} is too large to be the signed one")
            actual[name] = sha256_file(bundle / name)
            if actual[name] != signed[name]:
                raise errors[name](
                    f"{bundle.name}: {name} changed after signing (SHA-256 "
                    f"{actual[name][:16]}..., signed {signed[name][:16]}...)"
                )
        return actual
