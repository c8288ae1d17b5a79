"""Owner requests: an organisation's signed word that its expert leaves the pool (or returns).

Opt-out and opt-in are not just authorised by the TLS session; they are *signed*, so the
transparency log can later show that the owner asked. The statement is canonical JSON::

    {"action": "opt-out" | "opt-in", "expert_id": "sha256:...", "org": "acme",
     "time": "2025-01-01T12:00:00+00:00"}

signed with ECDSA P-256 / SHA-256 (DER) by a consortium owner certificate of that org. The
client builds and signs it with :func:`sign_owner_request`; the coordinator checks it with
:func:`verify_owner_request`: the signature, the certificate chain (CA and current CRL, role
owner), that the certificate's org is the statement's, the action is the one asked for, and
the time is within :data:`MAX_SKEW` of the coordinator's clock (a stale request is not
replayed later; the coordinator also refuses one not newer than the expert's last change).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import InvalidInputError, VerificationError
from flexfed.common.trust.pki import (
    Identity,
    PathLike,
    load_certificate,
    verify_chain,
)
from flexfed.common.util.clock import utc_now

if TYPE_CHECKING:
    from flexfed.proto.v1 import registry_pb2

ACTIONS: Final = ("opt-out", "opt-in")
MAX_SKEW: Final = dt.timedelta(minutes=10)
MAX_STATEMENT_BYTES: Final = 4096
_FIELDS: Final = frozenset({"action", "expert_id", "org", "time"})


class OwnerRequestError(VerificationError):
    """An owner request's signature, signer, action or time does not hold."""


class MalformedOwnerRequestError(InvalidInputError):
    """An owner request is not a statement of the expected shape."""


@dataclass(frozen=True)
class SignedOwnerRequest:
    """What travels in the API's ``OwnerRequest``."""

    statement: bytes  # canonical JSON, exactly as signed
    signature: bytes  # ECDSA P-256 / SHA-256, DER
    certificate_pem: bytes

    def to_proto(self) -> registry_pb2.OwnerRequest:
        """The API message (``OptOut``/``OptIn`` take it)."""
        from flexfed.proto.v1 import registry_pb2

        return registry_pb2.OwnerRequest(
            statement=self.statement,
            signature=self.signature,
            certificate_pem=self.certificate_pem,
        )

    @classmethod
    def from_proto(cls, message: registry_pb2.OwnerRequest) -> SignedOwnerRequest:
        return cls(
            bytes(message.statement), bytes(message.signature), bytes(message.certificate_pem)
        )


@dataclass(frozen=True)
class OwnerStatement:
    """A verified owner request."""

    action: str
    expert_id: str
    org: str
    time: str
    signer: Identity


def build_statement(
    action: str, expert_id: str, org: str, time: dt.datetime | None = None
) -> bytes:
    """The canonical statement bytes (sorted keys, no spaces) for ``action`` on an expert."""
    if action not in ACTIONS:
        raise MalformedOwnerRequestError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    # NOTE: microseconds kept: the coordinator refuses a request not newer than the expert's
    # last change, and an opt-out and an opt-in may well fall in the same second.
    when = (time or utc_now()).astimezone(dt.UTC)
    doc = {"action": action, "expert_id": expert_id, "org": org, "time": when.isoformat()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_owner_request(
    action: str,
    expert_id: str,
    org: str,
    key: ec.EllipticCurvePrivateKey | PathLike,
    cert: PathLike,
    *,
    time: dt.datetime | None = None,
) -> SignedOwnerRequest:
    """Build and sign an owner request with the owner's P-256 key and certificate."""
    from flexfed.common.trust.signing import load_private_key

    private = key if isinstance(key, ec.EllipticCurvePrivateKey) else load_private_key(key)
    certificate = load_certificate(cert)
    if private.public_key() != certificate.public_key():
        raise MalformedOwnerRequestError(f"the key is not the private key of {cert}")
    statement = build_statement(action, expert_id, org, time)
    signature = private.sign(statement, ec.ECDSA(hashes.SHA256()))
    return SignedOwnerRequest(
        statement, signature, certificate.public_bytes(serialization.Encoding.PEM)
    )


def parse_statement(statement: bytes) -> dict[str, Any]:
    """Decode a statement strictly: canonical JSON with exactly the four string fields."""
    if len(statement) > MAX_STATEMENT_BYTES:
        raise MalformedOwnerRequestError(f"statement is over {MAX_STATEMENT_BYTES} bytes")
    try:
        doc = json.loads(statement.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise MalformedOwnerRequestError(f"statement is not JSON: {err}") from err
    if not isinstance(doc, dict) or set(doc) != _FIELDS:
        raise MalformedOwnerRequestError(f"statement must have exactly {sorted(_FIELDS)}")
    if not all(isinstance(doc[k], str) for k in _FIELDS):
        raise MalformedOwnerRequestError("statement fields must be strings")
    if json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() != statement:
        raise MalformedOwnerRequestError("statement is not canonical JSON (sorted, no spaces)")
    return doc


def verify_owner_request(
    request: SignedOwnerRequest,
    action: str,
    ca_cert: x509.Certificate,
    crl: x509.CertificateRevocationList | None,
    *,
    at: dt.datetime | None = None,
    max_skew: dt.timedelta = MAX_SKEW,
) -> OwnerStatement:
    """Check an owner request for ``action``; return what it says, or raise.

    Raises :class:`MalformedOwnerRequestError` for a statement that cannot be read, a
    :class:`~flexfed.common.trust.pki.CertificateError` for a certificate the consortium does not
    trust now, and :class:`OwnerRequestError` for everything else.
    """
    now = at or utc_now()
    try:
        cert = x509.load_pem_x509_certificate(request.certificate_pem)
    except ValueError as err:
        raise MalformedOwnerRequestError(f"the request's certificate is unreadable: {err}") from err
    identity = verify_chain(cert, ca_cert, now, crl, roles=("owner",))
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise OwnerRequestError("the request's certificate does not hold an ECDSA key")
    try:
        key.verify(request.signature, request.statement, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise OwnerRequestError(
            "the request's signature does not verify with its certificate"
        ) from None
    doc = parse_statement(request.statement)
    if doc["action"] != action:
        raise OwnerRequestError(f"the statement asks for {doc['action']!r}, not {action!r}")
    if doc["org"] != identity.org:
        raise OwnerRequestError(f"the statement is for org {doc['org']!r} but signed by {identity}")
    try:
        when = dt.datetime.fromisoformat(doc["time"])
    except ValueError as err:
        raise MalformedOwnerRequestError(f"statement time {doc['time']!r} is not RFC 3339") from err
    if when.tzinfo is None:
        raise MalformedOwnerRequestError("statement time must carry a UTC offset")
    if abs(now - when) > max_skew:
        raise OwnerRequestError(
            f"the statement was made at {doc['time']}, more than {max_skew} from now "
            f"({now.replace(microsecond=0).isoformat()}); sign a fresh request (check clocks)"
        )
    return OwnerStatement(doc["action"], doc["expert_id"], doc["org"], doc["time"], identity)
