"""A member's private key and certificate request, made on the member's own machine.

Every member (owner, operator, auditor) makes its P-256 key and certificate request with
:func:`generate_key_and_csr` and never sends the key; the CA (:mod:`flexfed.common.trust.ca`)
issues the certificate from the request. Names follow the one org rule
(:data:`flexfed.common.formats.names.ORG_PATTERN`), which expert.json shares byte for byte.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flexfed.common.errors import (
    ConfigError,
    InvalidInputError,
)
from flexfed.common.formats.names import NAME_RULE, ORG_PATTERN

# NOTE: the private helpers are pki's own reading of a certificate (its attributes, key
# identifier, the CA's signature on it), shared so that the CA and the verifier agree.
from flexfed.common.trust.pki import (
    ROLES,
    PathLike,
    Role,
)
from flexfed.common.util.fs import atomic_write_bytes, write_private

logger = logging.getLogger(__name__)

KEY_FILE = "key.pem"
CSR_FILE = "csr.pem"


class KeyExistsError(ConfigError, FileExistsError):
    """A private key already lives where a new one would be written."""


class CertificateRequestError(InvalidInputError):
    """A certificate signing request (or what would go into one) is malformed or refused."""


class KeyRequest(NamedTuple):
    """What :func:`generate_key_and_csr` wrote."""

    key: Path
    csr: Path


def write_public(path: Path, data: bytes) -> None:
    """Write ``path`` atomically and durably, mode 0644."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, mode=0o644)
    except OSError as err:
        raise InvalidInputError(f"cannot write {path}: {err.strerror or err}") from err


def private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A P-256 key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # model-signing's certificate signer loads keys unencrypted
    )


def check_org(org: str) -> str:
    if not ORG_PATTERN.fullmatch(org):
        raise CertificateRequestError(f"organisation name {org!r} is not allowed: use {NAME_RULE}")
    return org


def check_role(role: str) -> Role:
    if role not in ROLES:
        raise CertificateRequestError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    return role


def generate_key_and_csr(org: str, out_dir: PathLike, role_hint: str | None = None) -> KeyRequest:
    """Make a data owner's (or operator's, auditor's) P-256 key and certificate request.

    The key is written with mode 0600 and never leaves ``out_dir``; the request (subject
    ``O=<org>``, ``CN=<org>``, and ``OU=<role_hint>`` when given) goes to the operator.
    """
    org = check_org(org)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if role_hint is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, check_role(role_hint)))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, org))
    out = Path(out_dir)
    key_path, csr_path = out / KEY_FILE, out / CSR_FILE
    if key_path.exists():
        raise KeyExistsError(
            f"{key_path} already exists; choose another --out, or delete it if you really mean "
            "to replace your key (its certificate then stops being usable)"
        )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .sign(key, hashes.SHA256())
    )
    try:
        write_private(key_path, private_pem(key))
    except FileExistsError:
        raise KeyExistsError(f"{key_path} already exists; it is never overwritten") from None
    write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    logger.info("wrote key %s and request %s for %s", key_path, csr_path, org)
    return KeyRequest(key_path, csr_path)
