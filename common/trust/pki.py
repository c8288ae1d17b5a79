"""The consortium PKI's certificates, and how every party checks them.

One CA (:mod:`flexfed.common.trust.ca`) certifies the data owners, the operator and the auditors.
Everything is ECDSA P-256 with SHA-256: OpenSSF model-signing and gRPC's TLS both accept it
(Ed25519 works in neither).

A leaf certificate carries its holder's organisation as subject ``O`` (and ``CN``) and its
role (``owner``, ``operator``, ``auditor``) twice, so both standard tools and our code read it:
subject ``OU=<role>`` and SAN URIs ``flexfed://role/<role>`` and ``flexfed://org/<org>``.
Key usage is digitalSignature; extended key usage is clientAuth for everyone (mutual TLS to the
Consortium API), plus codeSigning for owners and the operator (they sign artifacts) and
serverAuth for the operator (the coordinator's TLS server certificate).

:func:`verify_chain` is what the coordinator and auditors call; each way a certificate can
fail is its own :class:`~flexfed.common.errors.VerificationError` subclass below.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeAlias, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flexfed.common.errors import (
    FlexfedError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.util.clock import as_utc

logger = logging.getLogger(__name__)

PathLike: TypeAlias = str | os.PathLike[str]
Role = Literal["owner", "operator", "auditor"]
ROLES: tuple[Role, ...] = ("owner", "operator", "auditor")

ROLE_URI_PREFIX = "flexfed://role/"
ORG_URI_PREFIX = "flexfed://org/"

#: Extended key usages each role's certificate carries, and which the verifier requires.
ROLE_EKUS: dict[Role, tuple[x509.ObjectIdentifier, ...]] = {
    "owner": (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING),
    "operator": (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.CODE_SIGNING,
    ),
    "auditor": (ExtendedKeyUsageOID.CLIENT_AUTH,),
}
_EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
}
# NOTE: certificates start a little in the past so a peer whose clock lags still accepts them.
CLOCK_SKEW = dt.timedelta(minutes=5)
# Revocations for these reasons say nothing against what the key signed before the date; every
# other reason (key compromise, unspecified, ...) voids the certificate for all times, because
# nothing timestamps a signature independently of the signer.
BENIGN_REASONS = frozenset(
    {
        x509.ReasonFlags.superseded,
        x509.ReasonFlags.cessation_of_operation,
        x509.ReasonFlags.affiliation_changed,
    }
)


# --- errors --------------------------------------------------------------------------------


class CertificateError(VerificationError):
    """A certificate does not verify against the consortium CA."""


class MalformedCertificateError(CertificateError):
    """A certificate cannot be parsed."""


class UntrustedCertificateError(CertificateError):
    """A certificate was not issued by the consortium CA."""


class CertificateSignatureError(UntrustedCertificateError):
    """A certificate names the consortium CA as issuer but the CA's signature does not verify."""


class TrustAnchorError(UntrustedCertificateError):
    """The CA certificate given as trust anchor is unusable (not a CA, expired)."""


class CertificateExpiredError(CertificateError):
    """A certificate's validity ended before the time of verification."""


class CertificateNotYetValidError(CertificateError):
    """A certificate's validity starts after the time of verification."""


class CertificateRevokedError(CertificateError):
    """A certificate is listed on the consortium CA's revocation list."""


class CertificateUsageError(CertificateError):
    """A certificate's key usage, extended key usage or CA flag does not allow this use."""


class CertificateIdentityError(CertificateError):
    """A certificate does not name one organisation consistently."""


class CertificateRoleError(CertificateIdentityError):
    """A certificate carries no role, an unknown or inconsistent one, or one not allowed here."""


class CrlError(VerificationError):
    """A certificate revocation list is unusable."""


class MalformedCrlError(CrlError):
    """A CRL cannot be parsed."""


class CrlSignatureError(CrlError):
    """A CRL was not signed by the consortium CA."""


class CrlStaleError(CrlError):
    """A CRL's next update lies before the time of verification."""


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for: what :func:`verify_chain` returns."""

    org: str
    role: Role
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str = ""  # SHA-256 of the DER certificate, hex

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)

    def __str__(self) -> str:
        return f"{self.org} ({self.role}, serial {self.serial_hex})"


# --- small helpers -------------------------------------------------------------------------


def format_serial(serial: int) -> str:
    """A serial number as OpenSSL prints it (upper-case hex)."""
    return f"{serial:X}"


def fingerprint(cert: x509.Certificate) -> str:
    """The SHA-256 fingerprint of a certificate's DER encoding, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def parse_serial(text: str) -> int:
    """Parse a hex serial (``0x``-prefixed, colon-separated or plain, any case)."""
    digits = text.strip().removeprefix("0x").removeprefix("0X").replace(":", "")
    try:
        return int(digits, 16)
    except ValueError:
        raise InvalidInputError(
            f"{text!r} is neither a certificate file nor a hexadecimal serial number"
        ) from None


def _attr(name: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    return [str(a.value) for a in name.get_attributes_for_oid(oid)]


def _who(cert: x509.Certificate) -> str:
    orgs = _attr(cert.subject, NameOID.ORGANIZATION_NAME)
    who = orgs[0] if orgs else cert.subject.rfc4514_string() or "(no subject)"
    return f"certificate of {who!r} (serial {format_serial(cert.serial_number)})"


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


# --- reading and verifying -----------------------------------------------------------------


T = TypeVar("T")


def _load_pem_or_der(
    path: PathLike,
    what: str,
    pem: Callable[[bytes], T],
    der: Callable[[bytes], T],
    error: type[FlexfedError],
) -> T:
    """Read ``path`` and parse it as PEM (when it has a PEM header) or DER."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"{what} not found: {path}") from None
    try:
        return pem(data) if b"-----BEGIN" in data else der(data)
    except ValueError as err:
        raise error(f"{path} is not a readable {what}: {err}") from err


def load_certificate(path: PathLike) -> x509.Certificate:
    """Load one certificate (PEM, the first of a bundle, or DER)."""
    return _load_pem_or_der(
        path,
        "certificate",
        x509.load_pem_x509_certificate,
        x509.load_der_x509_certificate,
        MalformedCertificateError,
    )


def load_crl(path: PathLike) -> x509.CertificateRevocationList:
    """Load a certificate revocation list (PEM or DER)."""
    return _load_pem_or_der(
        path, "CRL", x509.load_pem_x509_crl, x509.load_der_x509_crl, MalformedCrlError
    )


def _san_values(cert: x509.Certificate, prefix: str) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {
        uri[len(prefix) :]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(prefix)
    }


def identity_of(cert: x509.Certificate) -> Identity:
    """Read who a certificate speaks for (org, role). Does *not* check who signed it.

    The org is subject ``O`` (and SAN ``flexfed://org/<org>`` must agree where present); the
    role is SAN ``flexfed://role/<role>`` or subject ``OU=<role>``, which must agree.
    """
    try:
        orgs = _attr(cert.subject, NameOID.ORGANIZATION_NAME)
        ous = set(_attr(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)) & set(ROLES)
        san_orgs = _san_values(cert, ORG_URI_PREFIX)
        san_roles = _san_values(cert, ROLE_URI_PREFIX)
        digest = fingerprint(cert)
        nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    except ValueError as err:
        raise MalformedCertificateError(f"unreadable certificate: {err}") from err
    who = _who(cert)
    if len(orgs) != 1:
        raise CertificateIdentityError(f"{who} does not name exactly one organisation (O=)")
    org = orgs[0]
    if san_orgs and san_orgs != {org}:
        raise CertificateIdentityError(
            f"{who} names organisation {org!r} but its SAN says {', '.join(sorted(san_orgs))!r}"
        )
    roles = san_roles or ous
    if not roles:
        raise CertificateRoleError(
            f"{who} carries no flexfed role (subject OU or SAN {ROLE_URI_PREFIX}<role>)"
        )
    if len(roles) > 1 or (ous and san_roles and ous != san_roles):
        raise CertificateRoleError(
            f"{who} carries conflicting roles: {', '.join(sorted(roles | ous))}"
        )
    (role,) = roles
    if role not in ROLES:
        raise CertificateRoleError(f"{who} has unknown role {role!r}")
    return Identity(
        org=org,
        role=role,
        serial=cert.serial_number,
        not_before=nb,
        not_after=na,
        fingerprint=digest,
    )


def _check_trust_anchor(ca_cert: x509.Certificate, at: dt.datetime) -> None:
    try:
        bc = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise TrustAnchorError("the trust anchor is not a CA certificate") from None
    if not bc.ca or not ku.key_cert_sign:
        raise TrustAnchorError("the trust anchor is not a CA certificate")
    if not isinstance(ca_cert.public_key(), ec.EllipticCurvePublicKey):
        raise TrustAnchorError("the trust anchor does not hold an ECDSA key")
    if at > ca_cert.not_valid_after_utc:
        raise TrustAnchorError(
            f"the consortium CA certificate expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}"
        )
    if at < ca_cert.not_valid_before_utc:
        raise TrustAnchorError(
            f"the consortium CA certificate is not valid before "
            f"{ca_cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
        )


def _check_signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Raise unless ``ca_cert``'s key signed ``cert`` (issuer name and key identifier too)."""
    who = _who(cert)
    ca_name = ca_cert.subject.rfc4514_string()
    if cert.issuer != ca_cert.subject:
        raise UntrustedCertificateError(
            f"{who} was issued by {cert.issuer.rfc4514_string()!r}, not by the consortium CA "
            f"{ca_name!r}"
        )
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        aki = None
    if aki is not None and aki.key_identifier not in (None, _ski(ca_cert).digest):
        raise UntrustedCertificateError(
            f"{who} was issued by another CA that is also called {ca_name!r}"
        )
    ca_key = ca_cert.public_key()
    try:
        algorithm = cert.signature_hash_algorithm
        if not isinstance(ca_key, ec.EllipticCurvePublicKey) or not isinstance(
            algorithm, hashes.SHA256 | hashes.SHA384 | hashes.SHA512
        ):
            raise InvalidSignature
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algorithm))
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        raise CertificateSignatureError(
            f"the consortium CA's signature on {who} does not verify: the certificate was "
            "altered or forged"
        ) from None


def _check_usage(cert: x509.Certificate, role: Role) -> None:
    who = _who(cert)
    ext = cert.extensions
    with contextlib.suppress(x509.ExtensionNotFound):
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CertificateUsageError(f"{who} is a CA certificate, not a member's")
    try:
        ku = ext.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateUsageError(f"{who} has no key usage extension") from None
    if not ku.digital_signature:
        raise CertificateUsageError(f"{who} does not allow digital signatures (key usage)")
    try:
        eku = set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        raise CertificateUsageError(f"{who} has no extended key usage extension") from None
    missing = [_EKU_NAMES[oid] for oid in ROLE_EKUS[role] if oid not in eku]
    if missing:
        raise CertificateUsageError(
            f"{who} is not valid for {', '.join(missing)} (extended key usage), which a "
            f"{role} certificate needs"
        )


def _check_revocation(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    crl: x509.CertificateRevocationList,
    at: dt.datetime,
    fresh_at: dt.datetime,
) -> None:
    ca_name = ca_cert.subject.rfc4514_string()
    if crl.issuer != ca_cert.subject:
        raise CrlSignatureError(
            f"the CRL was issued by {crl.issuer.rfc4514_string()!r}, not by the consortium CA "
            f"{ca_name!r}"
        )
    ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    ca_key = ca_cert.public_key()
    if (
        not ku.crl_sign
        or not isinstance(ca_key, ec.EllipticCurvePublicKey)
        or not crl.is_signature_valid(ca_key)
    ):
        raise CrlSignatureError(
            f"the CRL's signature does not verify against the consortium CA {ca_name!r}"
        )
    if crl.next_update_utc is not None and fresh_at > crl.next_update_utc:
        raise CrlStaleError(
            f"the CRL expired on {crl.next_update_utc:%Y-%m-%d %H:%M} UTC; fetch a fresh one "
            "(the operator makes it with `flexfed ca crl`)"
        )
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    if entry is None:
        return
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        reason = x509.ReasonFlags.unspecified
    when = entry.revocation_date_utc
    if reason in BENIGN_REASONS and when > at:
        logger.debug("%s revoked later (%s, %s)", _who(cert), when, reason.value)
        return
    raise CertificateRevokedError(
        f"{_who(cert)} was revoked on {when:%Y-%m-%d %H:%M} UTC (reason: {reason.value})"
    )


def verify_chain(
    cert: x509.Certificate,
    ca_cert: x509.Certificate,
    at: dt.datetime,
    crl: x509.CertificateRevocationList | None = None,
    *,
    roles: Iterable[str] | None = None,
    crl_fresh_at: dt.datetime | None = None,
) -> Identity:
    """Verify that the consortium CA certified ``cert`` and it was usable at time ``at``.

    Checks, in order: the trust anchor, issuer and the CA's ECDSA signature, the validity
    window, key usage and extended key usage for the role, the identity (org, role; one of
    ``roles`` when given), and, with a ``crl``: its signature, freshness at ``at``, and that
    ``cert`` is not on it. Returns who the certificate speaks for; raises a distinct
    :class:`CertificateError` (or :class:`CrlError`) subclass for each failure.

    A certificate revoked as superseded, ceased or affiliation-changed was still good before
    its revocation date; any other revocation voids it for every ``at``. A naive ``at`` is UTC.
    ``crl_fresh_at`` (default ``at``) is when the CRL must be current: judging a past
    signature (``at`` in the past) still needs a CRL fresh now, or a later key compromise
    would go unseen.
    """
    at = as_utc(at)
    _check_trust_anchor(ca_cert, at)
    _check_signed_by(cert, ca_cert)
    who = _who(cert)
    if at < cert.not_valid_before_utc:
        raise CertificateNotYetValidError(
            f"{who} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC "
            "(check this machine's clock)"
        )
    if at > cert.not_valid_after_utc:
        raise CertificateExpiredError(
            f"{who} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC; ask the "
            "consortium operator for a new one"
        )
    identity = identity_of(cert)
    _check_usage(cert, identity.role)
    if roles is not None:
        allowed = set(roles)
        if identity.role not in allowed:
            raise CertificateRoleError(
                f"{who} is an {identity.role} certificate; this needs "
                f"{' or '.join(sorted(allowed))}"
            )
    if crl is not None:
        fresh_at = as_utc(crl_fresh_at) if crl_fresh_at is not None else at
        _check_revocation(cert, ca_cert, crl, at, fresh_at)
    return identity
