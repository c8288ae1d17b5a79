"""Owner requests (opt-out / opt-in): every check of ``verify_owner_request`` holds alone.

Protects: the coordinator (or an operator calling with no org of its own) cannot forge an
owner's opt-out: a request verifies only with a valid signature over exactly its statement,
by an *owner* certificate of the statement's org that the consortium CA issued and has not
revoked, for the action asked, made within ten minutes of now (neither stale nor
future-dated), as canonical JSON. Each test here fails if its one check is removed.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import NamedTuple

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.trust.ca import init_ca, issue_certificate, revoke
from flexfed.common.trust.keys import generate_key_and_csr
from flexfed.common.trust.owner_request import (
    MalformedOwnerRequestError,
    OwnerRequestError,
    SignedOwnerRequest,
    sign_owner_request,
    verify_owner_request,
)
from flexfed.common.trust.pki import (
    CertificateRevokedError,
    CertificateRoleError,
    UntrustedCertificateError,
    load_certificate,
    load_crl,
)
from flexfed.common.trust.signing import load_private_key

# The CA and certificates are issued at the real time (when the module's fixtures run, which
# in a full run is minutes after this module is imported); requests are judged an hour after
# import, so always after the certificates exist and well within their validity.
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=1)
EXPERT = "sha256:" + "ab" * 32


class Member(NamedTuple):
    key: Path
    cert: Path


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("owner-requests")
    init_ca(root / "ca", "Owner Request Test CA")
    return root / "ca"


def member(ca: Path, org: str, role: str, out: Path) -> Member:
    req = generate_key_and_csr(org, out, role)
    issued = issue_certificate(ca, req.csr, role, out=out / "cert.pem")
    return Member(req.key, issued.path)


@pytest.fixture(scope="module")
def acme(ca: Path) -> Member:
    return member(ca, "acme", "owner", ca.parent / "acme")


def verify(request: SignedOwnerRequest, ca: Path, action: str = "opt-out", **kw: object) -> str:
    statement = verify_owner_request(
        request,
        action,
        load_certificate(ca / "ca.pem"),
        None,
        at=NOW,
        **kw,  # type: ignore[arg-type]
    )
    return f"{statement.action} {statement.org} {statement.expert_id == EXPERT}"


def signed(who: Member, doc: dict[str, str], signer: Member | None = None) -> SignedOwnerRequest:
    """A request whose statement is ``doc`` (as given), signed by ``signer`` (default who)."""
    statement = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    key = load_private_key((signer or who).key)
    return SignedOwnerRequest(
        statement,
        key.sign(statement, ec.ECDSA(hashes.SHA256())),
        who.cert.read_bytes(),
    )


def doc(**over: str) -> dict[str, str]:
    base = {"action": "opt-out", "expert_id": EXPERT, "org": "acme", "time": NOW.isoformat()}
    return {**base, **over}


def test_an_owners_request_verifies(ca: Path, acme: Member) -> None:
    request = sign_owner_request("opt-out", EXPERT, "acme", acme.key, acme.cert, time=NOW)
    assert verify(request, ca) == "opt-out acme True"
    assert verify(signed(acme, doc()), ca) == "opt-out acme True"


def test_a_statement_changed_after_signing_is_refused(ca: Path, acme: Member) -> None:
    good = signed(acme, doc())
    other = json.dumps(doc(expert_id="sha256:" + "cd" * 32), sort_keys=True, separators=(",", ":"))
    forged = SignedOwnerRequest(other.encode(), good.signature, good.certificate_pem)
    with pytest.raises(OwnerRequestError, match="signature does not verify"):
        verify(forged, ca)


def test_a_signature_by_another_key_is_refused(ca: Path, acme: Member, tmp_path: Path) -> None:
    """The operator holds acme's certificate (it is public) but not acme's key."""
    operator = member(ca, "consortium", "operator", tmp_path / "operator")
    with pytest.raises(OwnerRequestError, match="signature does not verify"):
        verify(signed(acme, doc(), signer=operator), ca)


def test_the_action_must_be_the_one_asked_for(ca: Path, acme: Member) -> None:
    opt_in = signed(acme, doc(action="opt-in"))
    assert verify(opt_in, ca, action="opt-in") == "opt-in acme True"
    with pytest.raises(OwnerRequestError, match="asks for 'opt-in', not 'opt-out'"):
        verify(opt_in, ca, action="opt-out")


@pytest.mark.parametrize(
    "offset", [dt.timedelta(minutes=11), dt.timedelta(minutes=-11), dt.timedelta(days=365)]
)
def test_stale_and_future_dated_requests_are_refused(
    ca: Path, acme: Member, offset: dt.timedelta
) -> None:
    request = signed(acme, doc(time=(NOW + offset).isoformat()))
    with pytest.raises(OwnerRequestError, match="more than 0:10:00 from now"):
        verify(request, ca)
    assert verify(signed(acme, doc(time=(NOW + dt.timedelta(minutes=9)).isoformat())), ca)


def test_only_an_owner_certificate_may_ask(ca: Path, tmp_path: Path) -> None:
    """An operator certificate of the same org name signs a perfect statement: refused."""
    operator = member(ca, "acme", "operator", tmp_path / "acme-operator")
    with pytest.raises(CertificateRoleError):
        verify(signed(operator, doc()), ca)
    auditor = member(ca, "acme", "auditor", tmp_path / "acme-auditor")
    with pytest.raises(CertificateRoleError):
        verify(signed(auditor, doc()), ca)


def test_an_owner_cannot_speak_for_another_org(ca: Path, acme: Member) -> None:
    with pytest.raises(OwnerRequestError, match="for org 'globex' but signed by acme"):
        verify(signed(acme, doc(org="globex")), ca)


def test_a_revoked_owner_certificate_is_refused(ca: Path, tmp_path: Path) -> None:
    leaky = member(ca, "leaky", "owner", tmp_path / "leaky")
    request = signed(leaky, doc(org="leaky"))
    assert verify(request, ca) == "opt-out leaky True"
    revoke(ca, leaky.cert, "key-compromise")
    crl = load_crl(ca / "crl.pem")
    with pytest.raises(CertificateRevokedError):
        verify_owner_request(request, "opt-out", load_certificate(ca / "ca.pem"), crl, at=NOW)


def test_a_certificate_from_another_ca_is_refused(ca: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "rogue", "Rogue CA")
    impostor = member(tmp_path / "rogue", "acme", "owner", tmp_path / "impostor")
    with pytest.raises(UntrustedCertificateError):
        verify(signed(impostor, doc()), ca)


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        (b'{"action": "opt-out"}', "exactly"),
        (b"not json", "not JSON"),
        (
            json.dumps(doc(), sort_keys=True).encode(),  # spaces: not canonical
            "not canonical JSON",
        ),
        (json.dumps({**doc(), "extra": "x"}).encode(), "exactly"),
    ],
)
def test_malformed_statements_are_refused(
    ca: Path, acme: Member, statement: bytes, message: str
) -> None:
    key = load_private_key(acme.key)
    request = SignedOwnerRequest(
        statement, key.sign(statement, ec.ECDSA(hashes.SHA256())), acme.cert.read_bytes()
    )
    with pytest.raises(MalformedOwnerRequestError, match=message):
        verify(request, ca)
