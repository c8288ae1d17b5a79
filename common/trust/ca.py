"""The consortium CA: members' keys and requests, issuing, revoking, and the CA's register.

The operator runs the CA; each member makes its key and certificate request with
:func:`generate_key_and_csr` and never sends the key. Certificates follow the profile of
:mod:`flexfed.common.trust.pki`, which is also how every party checks them. A CA directory holds:

- ``ca.pem``: the self-signed CA certificate (CA:true, pathlen 0, keyCertSign + cRLSign);
- ``ca.key``: its private key (PKCS#8 PEM, mode 0600; never printed, never sent);
- ``crl.pem``: the current certificate revocation list, signed by the CA;
- ``ca.json``: the CA's state (CRL number, issued certificates, revocations);
- ``issued/<SERIAL>.pem``: a copy of every certificate issued.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flexfed.common.errors import (
    ConfigError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.trust.keys import (
    CSR_FILE,
    CertificateRequestError,
    check_org,
    check_role,
    private_pem,
    write_public,
)

# NOTE: the private helpers are pki's own reading of a certificate (its attributes, key
# identifier, the CA's signature on it), shared so that the CA and the verifier agree.
from flexfed.common.trust.pki import (
    CLOCK_SKEW,
    ORG_URI_PREFIX,
    ROLE_EKUS,
    ROLE_URI_PREFIX,
    Identity,
    PathLike,
    _attr,
    _check_signed_by,
    _load_pem_or_der,
    _ski,
    format_serial,
    identity_of,
    load_certificate,
    parse_serial,
)
from flexfed.common.util.clock import as_utc, utc_now_seconds
from flexfed.common.util.fs import write_private

try:  # POSIX; the CA runs on the operator's Linux/macOS machine
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_CRL = "crl.pem"
CA_STATE = "ca.json"
ISSUED_DIR = "issued"
STATE_FORMAT = "flexfed.ca/v1"

_DNS_PATTERN = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    flag.name.replace("_", "-"): flag
    for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.certificate_hold, x509.ReasonFlags.remove_from_crl)
}


# --- errors --------------------------------------------------------------------------------


class CaExistsError(ConfigError, FileExistsError):
    """A CA already lives in the directory; it is never overwritten."""


class CaStateError(ConfigError):
    """The CA directory is incomplete or its state file is damaged."""


class UnknownCertificateError(InvalidInputError):
    """A serial number or certificate was not issued by this CA."""


class CsrSignatureError(VerificationError):
    """A certificate signing request's self-signature does not verify."""


# --- records -------------------------------------------------------------------------------


class CaPaths(NamedTuple):
    """The files of a CA directory."""

    cert: Path
    key: Path
    crl: Path
    state: Path


class IssuedCertificate(NamedTuple):
    """What :func:`issue_certificate` wrote, and whom it certifies."""

    path: Path
    identity: Identity


@dataclass(frozen=True)
class IssuedRecord:
    """One line of the CA's register (``ca.json``)."""

    serial: int
    org: str
    role: str
    not_before: dt.datetime
    not_after: dt.datetime
    fingerprint: str
    revoked_at: dt.datetime | None = None
    reason: str | None = None


# --- small helpers -------------------------------------------------------------------------


def _iso(when: dt.datetime) -> str:
    return as_utc(when).isoformat()


def _pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


@contextlib.contextmanager
def _locked(ca_dir: Path) -> Iterator[None]:
    """Serialise changes to one CA directory (two operators issuing at once)."""
    with open(ca_dir / ".lock", "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


# --- the CA --------------------------------------------------------------------------------


def ca_paths(ca_dir: PathLike) -> CaPaths:
    """The paths of the files in a CA directory (whether they exist or not)."""
    d = Path(ca_dir)
    return CaPaths(d / CA_CERT, d / CA_KEY, d / CA_CRL, d / CA_STATE)


def init_ca(
    out_dir: PathLike,
    name: str,
    days: int = 3650,
    *,
    crl_days: int = 30,
) -> CaPaths:
    """Create a consortium CA in ``out_dir``: certificate, private key, empty CRL, state.

    Refuses to touch a directory that already holds a CA (:class:`CaExistsError`).
    """
    out = Path(out_dir)
    name = name.strip()
    if not name or len(name) > 64 or not name.isprintable():
        raise ConfigError("the CA name must be 1-64 printable characters")
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    paths = ca_paths(out)
    existing = [p.name for p in (paths.cert, paths.key, paths.state) if p.exists()]
    if existing:
        raise CaExistsError(
            f"{out} already holds a CA ({', '.join(existing)}); it is never overwritten: "
            "choose another --out"
        )
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    (out / ISSUED_DIR).mkdir(mode=0o755, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    now = utc_now_seconds()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    try:
        write_private(paths.key, private_pem(key))
    except FileExistsError:
        raise CaExistsError(f"{paths.key} already exists; it is never overwritten") from None
    write_public(paths.cert, _pem(cert))
    state: dict[str, Any] = {"format": STATE_FORMAT, "name": name, "crl_number": 0}
    state.update(issued=[], revoked=[])
    _save_state(out, state)
    _write_crl_unlocked(out, cert, key, state, crl_days)
    logger.info("created CA %r in %s", name, out)
    return paths


def _load_state(ca_dir: Path) -> dict[str, Any]:
    path = ca_dir / CA_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CaStateError(
            f"{ca_dir} is not a CA directory (no {CA_STATE}); see `flexfed ca init`"
        ) from None
    except (OSError, ValueError) as err:
        raise CaStateError(f"cannot read {path}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CaStateError(f"{path} is not a flexfed CA state file ({STATE_FORMAT})")
    return state


def _save_state(ca_dir: Path, state: dict[str, Any]) -> None:
    write_public(ca_dir / CA_STATE, (json.dumps(state, indent=2, sort_keys=True) + "\n").encode())


def _open_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(ca_dir)
    if not paths.cert.is_file() or not paths.key.is_file():
        raise MissingFileError(
            f"no CA in {ca_dir} (expected {CA_CERT} and {CA_KEY}); create one with "
            "`flexfed ca init` or point --ca at it"
        )
    cert = load_certificate(paths.cert)
    try:
        key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise CaStateError(f"cannot load the CA key {paths.key}: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CaStateError(f"{paths.key} is not the private key of {paths.cert}")
    return cert, key


def load_csr(path: PathLike) -> x509.CertificateSigningRequest:
    """Load a certificate signing request (PEM or DER)."""
    return _load_pem_or_der(
        path,
        "certificate request",
        x509.load_pem_x509_csr,
        x509.load_der_x509_csr,
        CertificateRequestError,
    )


def _default_cert_path(csr_path: Path) -> Path:
    name = csr_path.name
    if name == CSR_FILE:
        return csr_path.with_name("cert.pem")
    for suffix in (".csr.pem", ".csr"):
        if name.endswith(suffix):
            return csr_path.with_name(name[: -len(suffix)] + ".cert.pem")
    return csr_path.with_name(csr_path.stem + ".cert.pem")


def _host_sans(san_dns: Iterable[str], san_ip: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in san_dns:
        if not _DNS_PATTERN.fullmatch(host):
            raise ConfigError(f"--san-dns {host!r} is not a DNS name")
        names.append(x509.DNSName(host))
    for ip in san_ip:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise ConfigError(f"--san-ip {ip!r} is not an IP address") from None
    return names


def issue_certificate(
    ca_dir: PathLike,
    csr_path: PathLike,
    role: str,
    days: int = 365,
    out: PathLike | None = None,
    *,
    san_dns: Iterable[str] = (),
    san_ip: Iterable[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> IssuedCertificate:
    """Verify a CSR and issue its holder a leaf certificate for ``role``.

    Only the subject's O and CN come from the request (never its extensions). ``san_dns`` and
    ``san_ip`` name the coordinator's TLS endpoints (operator only). ``not_before`` and
    ``not_after`` override the validity window verbatim (tests); by default it runs from now
    (less :data:`CLOCK_SKEW`) for ``days``, within the CA's own validity.
    """
    ca = Path(ca_dir)
    csr_path = Path(csr_path)
    role = check_role(role)
    if days < 1:
        raise ConfigError(f"--days must be at least 1, got {days}")
    host_names = _host_sans(san_dns, san_ip)
    if host_names and role != "operator":
        raise ConfigError("--san-dns/--san-ip are for the operator's TLS server certificate only")
    ca_cert, ca_key = _open_ca(ca)

    csr = load_csr(csr_path)
    if not csr.is_signature_valid:
        raise CsrSignatureError(
            f"the signature of {csr_path} does not verify: the request was altered or not made "
            "with the key it carries"
        )
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CertificateRequestError(
            f"{csr_path} is not for an ECDSA P-256 key; make it with `flexfed client keygen`"
        )
    orgs = _attr(csr.subject, NameOID.ORGANIZATION_NAME)
    if len(orgs) != 1:
        raise CertificateRequestError(f"{csr_path} must name exactly one organisation (O=)")
    org = check_org(orgs[0])
    cns = _attr(csr.subject, NameOID.COMMON_NAME)
    cn = cns[0] if len(cns) == 1 else org
    if not cn.isprintable() or len(cn) > 64:
        raise CertificateRequestError(f"{csr_path} has an unusable common name (CN=)")
    hints = _attr(csr.subject, NameOID.ORGANIZATIONAL_UNIT_NAME)
    if hints and hints != [role]:
        raise CertificateRequestError(
            f"{csr_path} asks for role {', '.join(hints)!r} but --role is {role!r}; "
            "check who sent it, or have them make a new request"
        )

    now = utc_now_seconds()
    if now > ca_cert.not_valid_after_utc:
        raise CaStateError(
            f"the CA certificate expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; create a new CA"
        )
    if not_before is None and not_after is None:
        start = max(now - CLOCK_SKEW, ca_cert.not_valid_before_utc)
        end = now + dt.timedelta(days=days)
        if end > ca_cert.not_valid_after_utc:
            logger.warning("certificate validity cut to the CA's, which ends sooner")
            end = ca_cert.not_valid_after_utc
    else:
        start = as_utc(not_before) if not_before is not None else now - CLOCK_SKEW
        end = as_utc(not_after) if not_after is not None else start + dt.timedelta(days=days)
    if end <= start:
        raise ConfigError("the certificate's validity would end before it starts")

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(ROLE_URI_PREFIX + role),
        x509.UniformResourceIdentifier(ORG_URI_PREFIX + org),
        *host_names,
    ]
    if role == "operator" and not host_names:
        logger.warning(
            "operator certificate without --san-dns/--san-ip: TLS clients will not "
            "accept it as the coordinator's server certificate"
        )

    with _locked(ca):
        state = _load_state(ca)
        taken = {int(rec["serial"], 16) for rec in state["issued"]}
        serial = x509.random_serial_number()
        while serial in taken:  # pragma: no cover - 159 random bits
            serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                _key_usage(digital_signature=True),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(list(ROLE_EKUS[role])), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(ca_cert)),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        identity = identity_of(cert)
        write_public(ca / ISSUED_DIR / f"{format_serial(serial)}.pem", _pem(cert))
        state["issued"].append(
            {
                "serial": format_serial(serial),
                "org": org,
                "role": role,
                "not_before": _iso(start),
                "not_after": _iso(end),
                "fingerprint": identity.fingerprint,
            }
        )
        _save_state(ca, state)
    out_path = Path(out) if out is not None else _default_cert_path(csr_path)
    write_public(out_path, _pem(cert))
    logger.info("issued %s to %s", identity, out_path)
    return IssuedCertificate(out_path, identity)


def _revocation_target(
    ca_cert: x509.Certificate, what: int | PathLike | x509.Certificate
) -> tuple[int, x509.Certificate | None]:
    if isinstance(what, int):
        return what, None
    if isinstance(what, x509.Certificate):
        cert = what
    elif Path(what).is_file():
        cert = load_certificate(what)
    elif isinstance(what, str):
        return parse_serial(what), None
    else:
        raise MissingFileError(f"certificate not found: {what}")
    _check_signed_by(cert, ca_cert)
    return cert.serial_number, cert


def revoke(
    ca_dir: PathLike,
    serial_or_cert: int | PathLike | x509.Certificate,
    reason: str = "unspecified",
    *,
    at: dt.datetime | None = None,
    crl_days: int = 30,
) -> IssuedRecord:
    """Revoke a certificate this CA issued and write the new CRL (``crl.pem``).

    ``serial_or_cert`` is a serial number (int or hex string), a certificate file or a loaded
    certificate. ``reason`` is one of :data:`REVOCATION_REASONS` (``key-compromise``...).
    Revoking twice changes nothing and returns the first revocation.
    """
    ca = Path(ca_dir)
    flag = REVOCATION_REASONS.get(reason.replace("_", "-")) or next(
        (f for f in REVOCATION_REASONS.values() if f.value == reason), None
    )
    if flag is None:
        raise ConfigError(
            f"unknown revocation reason {reason!r}; use one of {', '.join(REVOCATION_REASONS)}"
        )
    when = as_utc(at).replace(microsecond=0) if at is not None else utc_now_seconds()
    ca_cert, ca_key = _open_ca(ca)
    serial, cert = _revocation_target(ca_cert, serial_or_cert)
    with _locked(ca):
        state = _load_state(ca)
        records = {int(rec["serial"], 16): rec for rec in state["issued"]}
        if serial not in records:
            if cert is None:
                raise UnknownCertificateError(
                    f"serial {format_serial(serial)} was not issued by this CA "
                    "(`flexfed ca show` lists what it issued)"
                )
            ident = identity_of(cert)  # signed by our key but missing from the register
            records[serial] = {
                "serial": format_serial(serial),
                "org": ident.org,
                "role": ident.role,
                "not_before": _iso(ident.not_before),
                "not_after": _iso(ident.not_after),
                "fingerprint": ident.fingerprint,
            }
            state["issued"].append(records[serial])
        if not any(int(r["serial"], 16) == serial for r in state["revoked"]):
            state["revoked"].append(
                {"serial": format_serial(serial), "revoked_at": _iso(when), "reason": flag.value}
            )
            _write_crl_unlocked(ca, ca_cert, ca_key, state, crl_days)
            logger.info("revoked serial %s (%s)", format_serial(serial), flag.value)
    return _records(state)[serial]


def _write_crl_unlocked(
    ca: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    state: dict[str, Any],
    days: int,
) -> x509.CertificateRevocationList:
    if days < 1:
        raise ConfigError(f"the CRL must be valid for at least 1 day, got {days}")
    state["crl_number"] = int(state.get("crl_number", 0)) + 1
    now = utc_now_seconds()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(state["crl_number"]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(ca_cert)),
            critical=False,
        )
    )
    for rec in state["revoked"]:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(int(rec["serial"], 16))
            .revocation_date(dt.datetime.fromisoformat(rec["revoked_at"]))
        )
        flag = x509.ReasonFlags(rec["reason"])
        if flag is not x509.ReasonFlags.unspecified:  # RFC 5280 5.3.1: omit, don't say it
            entry = entry.add_extension(x509.CRLReason(flag), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca_key, hashes.SHA256())
    write_public(ca / CA_CRL, _pem(crl))
    _save_state(ca, state)
    return crl


def write_crl(ca_dir: PathLike, out: PathLike | None = None, *, days: int = 30) -> Path:
    """Sign a fresh CRL (valid ``days``) into ``ca_dir/crl.pem`` and, if given, ``out``."""
    ca = Path(ca_dir)
    ca_cert, ca_key = _open_ca(ca)
    with _locked(ca):
        crl = _write_crl_unlocked(ca, ca_cert, ca_key, _load_state(ca), days)
    if out is None:
        return ca / CA_CRL
    write_public(Path(out), _pem(crl))
    return Path(out)


def _records(state: dict[str, Any]) -> dict[int, IssuedRecord]:
    revoked = {int(r["serial"], 16): r for r in state["revoked"]}
    out: dict[int, IssuedRecord] = {}
    for rec in state["issued"]:
        serial = int(rec["serial"], 16)
        rev = revoked.get(serial)
        out[serial] = IssuedRecord(
            serial=serial,
            org=rec["org"],
            role=rec["role"],
            not_before=dt.datetime.fromisoformat(rec["not_before"]),
            not_after=dt.datetime.fromisoformat(rec["not_after"]),
            fingerprint=rec["fingerprint"],
            revoked_at=dt.datetime.fromisoformat(rev["revoked_at"]) if rev else None,
            reason=rev["reason"] if rev else None,
        )
    return out


def issued_certificates(ca_dir: PathLike) -> list[IssuedRecord]:
    """Every certificate the CA issued, oldest first, with its revocation if any."""
    return list(_records(_load_state(Path(ca_dir))).values())
