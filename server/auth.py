"""Who is calling: mutual TLS with the consortium CA, and the role policy of every RPC.

gRPC's TLS layer already refuses a client without a certificate signed by the CA (the server
requires client authentication). :class:`Authorizer` then reads the verified peer certificate of
each call, checks it again with flexfed's own rules (:func:`flexfed.common.trust.pki.verify_chain`:
key usage, role, validity and the current CRL, so a revoked certificate is refused even while its
TLS session lives on), and enforces which roles may call what:

- ``owner``: upload artifacts, submit experts, opt out and in, for its own organisation only;
- ``auditor``: read (artifacts, registry, log);
- ``operator``: everything, including revocation and releases.

Handlers call ``caller = authorizer.require(context, "owner", "operator")`` first; it aborts
the call with ``UNAUTHENTICATED`` (no usable certificate) or ``PERMISSION_DENIED`` (revoked,
or the wrong role) and otherwise returns the :class:`Caller`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from cryptography import x509

from flexfed.common.errors import (
    AssemblyError,
    ConfigError,
    FlexfedError,
    InvalidInputError,
    TransferError,
    VerificationError,
)
from flexfed.common.trust.pki import (
    CertificateError,
    CertificateRevokedError,
    CertificateRoleError,
    CrlError,
    load_certificate,
    load_crl,
    verify_chain,
)
from flexfed.common.util.clock import utc_now

log = logging.getLogger(__name__)

ROLES = ("owner", "operator", "auditor")


@dataclass(frozen=True)
class Caller:
    """The verified identity behind one call."""

    org: str
    role: str
    serial: str  # the certificate's serial number, hex

    def __str__(self) -> str:
        return f"{self.org} ({self.role})"


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with ``code`` and a one-line message (``context.abort`` raises)."""
    context.abort(code, message)
    raise AssertionError("unreachable: ServicerContext.abort raises")


class Authorizer:
    """Maps a call's TLS peer certificate to a :class:`Caller` and checks its role.

    ``crl_path`` is re-read when its modification time changes, so publishing a new CRL
    (``flexfed ca crl --out ...``) takes effect without a restart.
    """

    def __init__(self, ca_cert: Path, crl_path: Path | None = None) -> None:
        self.ca = load_certificate(ca_cert)
        self.crl_path = crl_path
        self._crl: x509.CertificateRevocationList | None = None
        self._crl_mtime: float | None = None
        self._lock = threading.Lock()

    def _current_crl(self) -> x509.CertificateRevocationList | None:
        if self.crl_path is None:
            return None
        with self._lock:
            mtime = self.crl_path.stat().st_mtime
            if self._crl is None or mtime != self._crl_mtime:
                self._crl = load_crl(self.crl_path)
                self._crl_mtime = mtime
            return self._crl

    def identify(self, pem: bytes) -> Caller:
        """The caller behind a PEM certificate; raises :class:`CertificateError` if unusable."""
        cert = x509.load_pem_x509_certificate(pem)
        identity = verify_chain(cert, self.ca, utc_now(), self._current_crl())
        return Caller(org=identity.org, role=identity.role, serial=identity.serial_hex)

    def caller(self, context: grpc.ServicerContext) -> Caller:
        """The verified caller of this call, or abort ``UNAUTHENTICATED``/``PERMISSION_DENIED``."""
        certs = context.auth_context().get("x509_pem_cert") or []
        if not certs:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        try:
            return self.identify(certs[0])
        except (OSError, CrlError) as err:
            # FIX (issue 12): a deleted CRL answered UNKNOWN "[Errno 2] ...<path>". The CRL is
            # the coordinator's (a bad one is never the caller's fault); without it revoked
            # members cannot be told apart, so every call is refused (a missing or broken CRL
            # must not un-revoke anybody), naming no path.
            log.error("cannot read the CRL %s: %s; refusing every call", self.crl_path, err)
            abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the coordinator cannot read its certificate revocation list; it refuses "
                "every call until its operator restores it",
            )
        except (CertificateRevokedError, CertificateRoleError) as err:
            abort(context, grpc.StatusCode.PERMISSION_DENIED, str(err))
        except (CertificateError, ValueError) as err:
            abort(context, grpc.StatusCode.UNAUTHENTICATED, f"certificate refused: {err}")

    def require(self, context: grpc.ServicerContext, *roles: str) -> Caller:
        """The caller, if its role is one of ``roles`` (the operator always may)."""
        caller = self.caller(context)
        if caller.role != "operator" and caller.role not in roles:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} may not call this (needs {' or '.join(roles) or 'operator'})",
            )
        return caller

    @staticmethod
    def require_org(context: grpc.ServicerContext, caller: Caller, org: str) -> None:
        """Owners act only for their own organisation (the operator for anyone)."""
        if caller.role != "operator" and caller.org != org:
            abort(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller} may not act for organisation {org!r}",
            )


# FlexfedError family -> gRPC status, for handlers that turn a library error into a status.
def status_of(err: FlexfedError) -> grpc.StatusCode:
    if isinstance(err, VerificationError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, InvalidInputError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(err, TransferError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(err, AssemblyError | ConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL
