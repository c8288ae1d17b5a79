"""The consortium PKI: a CA certifies owners, the operator and auditors, and we can tell.

Protects: the whole flow (init -> keygen -> issue -> verify) for every role; each way a
certificate can fail verification raises its own VerificationError subclass (never a plain
ValueError); private keys are 0600 and never printed; the certificates are standard enough for
`openssl verify` (with a CRL), Python's ssl mutual TLS and gRPC's mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flexfed.client.keys import keygen
from flexfed.common.errors import ConfigError, VerificationError
from flexfed.common.trust.ca import (
    CA_CERT,
    CA_CRL,
    CA_KEY,
    CaExistsError,
    CsrSignatureError,
    UnknownCertificateError,
    init_ca,
    issue_certificate,
    issued_certificates,
    revoke,
    write_crl,
)
from flexfed.common.trust.keys import CertificateRequestError, KeyExistsError, generate_key_and_csr
from flexfed.common.trust.pki import (
    ROLE_EKUS,
    ROLES,
    CertificateExpiredError,
    CertificateIdentityError,
    CertificateNotYetValidError,
    CertificateRevokedError,
    CertificateRoleError,
    CertificateSignatureError,
    CertificateUsageError,
    CrlSignatureError,
    CrlStaleError,
    UntrustedCertificateError,
    format_serial,
    identity_of,
    load_certificate,
    load_crl,
    verify_chain,
)
from flexfed.server.cli.ca import group as ca_cli

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not on PATH")


class Member(NamedTuple):
    org: str
    role: str
    key: Path
    cert: Path


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_member(ca: Path, tmp: Path, org: str, role: str, **issue_kw: Any) -> Member:
    req = generate_key_and_csr(org, tmp / f"{org}-{role}", role_hint=role)
    if role == "operator":
        issue_kw.setdefault("san_dns", ["localhost"])
        issue_kw.setdefault("san_ip", ["127.0.0.1"])
    issued = issue_certificate(ca, req.csr, role, **issue_kw)
    return Member(org, role, req.key, issued.path)


def verify(member: Member | Path, ca: Path, at: dt.datetime | None = None, **kw: Any) -> Any:
    path = member.cert if isinstance(member, Member) else member
    return verify_chain(
        load_certificate(path),
        load_certificate(ca / CA_CERT),
        at or now(),
        load_crl(ca / CA_CRL),
        **kw,
    )


def forge(ca: Path, build: Callable[[x509.CertificateBuilder], x509.CertificateBuilder]) -> Path:
    """A certificate the real CA key signs but `flexfed ca issue` would never make."""
    ca_cert = load_certificate(ca / CA_CERT)
    ca_key = serialization.load_pem_private_key((ca / CA_KEY).read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    base = (
        x509.CertificateBuilder()
        .issuer_name(ca_cert.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now() - dt.timedelta(hours=1))
        .not_valid_after(now() + dt.timedelta(days=1))
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), True
        )
    )
    cert = build(base).sign(ca_key, hashes.SHA256())
    path = ca.parent / f"forged-{cert.serial_number}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca", "Consortium CA", 30)
    return tmp_path / "ca"


@pytest.fixture
def members(ca: Path, tmp_path: Path) -> dict[str, Member]:
    return {role: make_member(ca, tmp_path, f"org-{role}", role) for role in ROLES}


# --- the happy path ------------------------------------------------------------------------


def test_ca_is_a_p256_ca_with_private_key_0600_and_an_empty_signed_crl(ca: Path) -> None:
    cert = load_certificate(ca / CA_CERT)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ku.key_cert_sign and ku.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert stat.S_IMODE((ca / CA_KEY).stat().st_mode) == 0o600
    crl = load_crl(ca / CA_CRL)
    assert len(crl) == 0 and crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]


def test_every_role_flows_from_keygen_to_a_verified_identity(
    ca: Path, members: dict[str, Member]
) -> None:
    for role, member in members.items():
        assert stat.S_IMODE(member.key.stat().st_mode) == 0o600
        cert = load_certificate(member.cert)
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
            member.org
        )
        assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == (
            role
        )
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert f"flexfed://role/{role}" in uris and f"flexfed://org/{member.org}" in uris
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert eku == set(ROLE_EKUS[role])  # type: ignore[index]
        assert (ExtendedKeyUsageOID.SERVER_AUTH in eku) == (role == "operator")
        assert (ExtendedKeyUsageOID.CODE_SIGNING in eku) == (role != "auditor")

        # inside the CA's validity: model-signing checks the chain at the leaf's not_before
        ca_cert = load_certificate(ca / CA_CERT)
        assert ca_cert.not_valid_before_utc <= cert.not_valid_before_utc <= now()
        assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc

        ident = identity_of(cert)
        assert (ident.org, ident.role, ident.serial) == (member.org, role, cert.serial_number)
        assert verify(member, ca, roles=[role]) == ident
    assert {r.role for r in issued_certificates(ca)} == set(ROLES)


def test_refuses_to_overwrite_a_ca_or_a_key(ca: Path, tmp_path: Path) -> None:
    before = (ca / CA_KEY).read_bytes()
    with pytest.raises(CaExistsError, match="never overwritten"):
        init_ca(ca, "Consortium CA")
    assert (ca / CA_KEY).read_bytes() == before
    generate_key_and_csr("acme", tmp_path / "acme")
    with pytest.raises(KeyExistsError):
        generate_key_and_csr("acme", tmp_path / "acme")


def test_requests_are_checked_before_anything_is_issued(ca: Path, tmp_path: Path) -> None:
    with pytest.raises(CertificateRequestError, match="not allowed"):
        generate_key_and_csr("Acme Hospital/x", tmp_path / "bad")
    with pytest.raises(CertificateRequestError, match="no '--'"):  # the slot separator
        generate_key_and_csr("acme--labs", tmp_path / "bad")
    generate_key_and_csr("acme-labs", tmp_path / "fine")
    req = generate_key_and_csr("acme", tmp_path / "acme", role_hint="owner")
    with pytest.raises(CertificateRequestError, match="asks for role 'owner'"):
        issue_certificate(ca, req.csr, "operator")
    with pytest.raises(ConfigError, match="operator"):
        issue_certificate(ca, req.csr, "owner", san_dns=["localhost"])
    # A P-384 request (not "P-256 everywhere")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "beta")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    (tmp_path / "p384.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertificateRequestError, match="P-256"):
        issue_certificate(ca, tmp_path / "p384.csr", "owner")
    assert issued_certificates(ca) == []


# --- each failure, its own error -----------------------------------------------------------


def test_expired_and_not_yet_valid(ca: Path, tmp_path: Path) -> None:
    old = make_member(
        ca,
        tmp_path,
        "old",
        "owner",
        not_before=now() - dt.timedelta(days=10),
        not_after=now() - dt.timedelta(days=1),
    )
    with pytest.raises(CertificateExpiredError, match="expired"):
        verify(old, ca)
    future = make_member(
        ca,
        tmp_path,
        "future",
        "owner",
        not_before=now() + dt.timedelta(days=1),
        not_after=now() + dt.timedelta(days=10),
    )
    with pytest.raises(CertificateNotYetValidError, match="not valid before"):
        verify(future, ca)
    assert verify(future, ca, at=now() + dt.timedelta(days=2)).org == "future"


def test_revoked_after_revoke_and_crl(ca: Path, members: dict[str, Member]) -> None:
    owner = members["owner"]
    old_crl = load_crl(ca / CA_CRL)
    rec = revoke(ca, owner.cert, "key-compromise")
    assert rec.revoked_at is not None and rec.reason == "keyCompromise"
    with pytest.raises(CertificateRevokedError, match=r"revoked on .*keyCompromise"):
        verify(owner, ca)
    # a key compromise voids earlier signatures too: nothing timestamps them independently
    with pytest.raises(CertificateRevokedError):
        verify(owner, ca, at=now() - dt.timedelta(minutes=1))
    # the old CRL does not list it; the others stay good on the new one
    cert, ca_cert = load_certificate(owner.cert), load_certificate(ca / CA_CERT)
    verify_chain(cert, ca_cert, now(), old_crl)
    verify(members["auditor"], ca)
    # by hex serial, twice: idempotent
    again = revoke(ca, format_serial(rec.serial))
    assert again == rec and len(load_crl(ca / CA_CRL)) == 1
    with pytest.raises(UnknownCertificateError):
        revoke(ca, "DEADBEEF")


def test_superseded_certificate_was_good_before_its_revocation(
    ca: Path, members: dict[str, Member]
) -> None:
    owner = members["owner"]
    revoke(ca, owner.cert, "superseded", at=now() + dt.timedelta(hours=1))
    assert verify(owner, ca).org == owner.org  # before the revocation date
    with pytest.raises(CertificateRevokedError, match="superseded"):
        verify(owner, ca, at=now() + dt.timedelta(hours=2))


def test_stale_or_foreign_crl(ca: Path, tmp_path: Path, members: dict[str, Member]) -> None:
    write_crl(ca, days=1)
    with pytest.raises(CrlStaleError, match="flexfed ca crl"):
        verify(members["owner"], ca, at=now() + dt.timedelta(days=2))
    other = init_ca(tmp_path / "other", "Consortium CA")
    cert, ca_cert = load_certificate(members["owner"].cert), load_certificate(ca / CA_CERT)
    with pytest.raises(CrlSignatureError):
        verify_chain(cert, ca_cert, now(), load_crl(other.crl))


def test_certificate_from_another_ca(ca: Path, tmp_path: Path) -> None:
    same_name = init_ca(tmp_path / "evil", "Consortium CA")
    other_name = init_ca(tmp_path / "else", "Someone Else CA")
    for evil in (same_name, other_name):
        mallory = make_member(evil.cert.parent, tmp_path / evil.cert.parent.name, "acme", "owner")
        with pytest.raises(UntrustedCertificateError):
            verify(mallory, ca)


def test_tampered_certificate(ca: Path, members: dict[str, Member], tmp_path: Path) -> None:
    der = load_certificate(members["owner"].cert).public_bytes(serialization.Encoding.DER)
    renamed = der.replace(b"org-owner", b"org-owneR", 1)  # the subject O, one byte
    last = der[:-1] + bytes([der[-1] ^ 1])  # the CA's signature, one bit
    for i, forged in enumerate((renamed, last)):
        assert forged != der
        (tmp_path / f"t{i}.der").write_bytes(forged)
        with pytest.raises(CertificateSignatureError, match="altered or forged") as err:
            verify(tmp_path / f"t{i}.der", ca)
        assert not isinstance(err.value, ValueError)


def test_csr_with_a_bad_signature(ca: Path, tmp_path: Path) -> None:
    req = generate_key_and_csr("acme", tmp_path / "acme")
    der = x509.load_pem_x509_csr(req.csr.read_bytes()).public_bytes(serialization.Encoding.DER)
    bad = tmp_path / "bad.csr"
    bad.write_bytes(der.replace(b"acme", b"acmf", 1))
    with pytest.raises(CsrSignatureError, match="altered"):
        issue_certificate(ca, bad, "owner")
    assert issued_certificates(ca) == []


def _subject(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def _san(*uris: str) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])


def _eku(role: str) -> x509.ExtendedKeyUsage:
    return x509.ExtendedKeyUsage(list(ROLE_EKUS[role]))  # type: ignore[index]


ORG, UNIT = NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME


@pytest.mark.parametrize(
    ("subject", "san", "error", "message"),
    [
        pytest.param((ORG, "acme"), None, CertificateRoleError, "no flexfed role", id="no-role"),
        pytest.param(
            (ORG, "acme"),
            _san("flexfed://role/owner", "flexfed://role/auditor"),
            CertificateRoleError,
            "conflicting roles",
            id="two-roles",
        ),
        pytest.param(
            (UNIT, "owner"),
            _san("flexfed://role/owner"),
            CertificateIdentityError,
            "organisation",
            id="no-org",
        ),
        pytest.param(
            (ORG, "acme"),
            _san("flexfed://role/owner", "flexfed://org/beta"),
            CertificateIdentityError,
            "SAN says",
            id="org-mismatch",
        ),
        pytest.param(
            (ORG, "acme"),
            _san("flexfed://role/root"),
            CertificateRoleError,
            "unknown role",
            id="unknown-role",
        ),
    ],
)
def test_identity_must_be_one_org_and_one_known_role(
    ca: Path,
    subject: tuple[x509.ObjectIdentifier, str],
    san: x509.SubjectAlternativeName | None,
    error: type[VerificationError],
    message: str,
) -> None:
    def build(b: x509.CertificateBuilder) -> x509.CertificateBuilder:
        b = b.subject_name(_subject(subject)).add_extension(_eku("owner"), False)
        return b.add_extension(san, False) if san is not None else b

    path = forge(ca, build)
    with pytest.raises(error, match=message):
        identity_of(load_certificate(path))
    with pytest.raises(error):
        verify(path, ca)


def test_role_from_ou_alone_is_read(ca: Path) -> None:
    path = forge(
        ca,
        lambda b: b.subject_name(_subject((ORG, "acme"), (UNIT, "auditor"))).add_extension(
            _eku("auditor"), False
        ),
    )
    assert verify(path, ca).role == "auditor"


def test_role_and_usage_must_fit(ca: Path, members: dict[str, Member]) -> None:
    with pytest.raises(CertificateRoleError, match="needs operator or owner"):
        verify(members["auditor"], ca, roles={"owner", "operator"})
    # an owner certificate without codeSigning cannot sign expert bundles
    no_code_signing = forge(
        ca,
        lambda b: b.subject_name(_subject((ORG, "acme"), (UNIT, "owner"))).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
        ),
    )
    with pytest.raises(CertificateUsageError, match="codeSigning"):
        verify(no_code_signing, ca)


# --- the CLI -------------------------------------------------------------------------------


def test_cli_flow_never_prints_a_private_key(tmp_path: Path) -> None:
    runner = CliRunner()
    ca, owner = tmp_path / "ca", tmp_path / "acme"
    outputs = []

    def ok(cmd: Any, *args: str | Path) -> str:
        result = runner.invoke(cmd, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
        return result.output

    ok(ca_cli, "init", "--out", ca, "--name", "Test CA")
    ok(keygen, "--org", "acme", "--out", owner)
    assert "issued owner certificate for 'acme'" in ok(
        ca_cli, "issue", owner / "csr.pem", "--role", "owner", "--ca", ca
    )
    assert "OK" in ok(ca_cli, "show", owner / "cert.pem", "--ca", ca)
    assert "acme" in ok(ca_cli, "show", "--ca", ca)
    assert "revoked" in ok(ca_cli, "revoke", owner / "cert.pem", "--ca", ca)
    ok(ca_cli, "crl", "--ca", ca, "--out", tmp_path / "published.pem")
    assert len(load_crl(tmp_path / "published.pem")) == 1
    assert "PRIVATE KEY" not in "".join(outputs)

    result = runner.invoke(ca_cli, ["show", str(owner / "cert.pem"), "--ca", str(ca)])
    assert isinstance(result.exception, CertificateRevokedError)
    result = runner.invoke(ca_cli, ["init", "--out", str(ca)])
    assert isinstance(result.exception, CaExistsError)
    assert result.exception.exit_code == 2


# --- interoperability ----------------------------------------------------------------------


def _openssl_verify(ca: Path, cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    cmd = [OPENSSL, "verify", "-CAfile", str(ca / CA_CERT), "-crl_check"]
    cmd += ["-CRLfile", str(ca / CA_CRL), "-x509_strict", *extra, str(cert)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@needs_openssl
def test_openssl_verifies_good_and_rejects_revoked(ca: Path, members: dict[str, Member]) -> None:
    for member in members.values():
        assert _openssl_verify(ca, member.cert).returncode == 0
    assert _openssl_verify(ca, members["owner"].cert, "-purpose", "sslclient").returncode == 0
    assert _openssl_verify(ca, members["operator"].cert, "-purpose", "sslserver").returncode == 0
    assert _openssl_verify(ca, members["owner"].cert, "-purpose", "sslserver").returncode != 0
    revoke(ca, members["owner"].cert)
    result = _openssl_verify(ca, members["owner"].cert)
    assert result.returncode != 0 and "revoked" in (result.stdout + result.stderr)
    assert _openssl_verify(ca, members["auditor"].cert).returncode == 0


@needs_openssl
def test_a_csr_made_by_openssl_is_accepted(ca: Path, tmp_path: Path) -> None:
    assert OPENSSL is not None
    key, csr = tmp_path / "k.pem", tmp_path / "r.csr"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    files = ["-keyout", str(key), "-out", str(csr)]
    subprocess.run(
        [OPENSSL, "req", "-new", *new_key, *files, "-subj", "/O=beta/CN=beta"],
        check=True,
        capture_output=True,
    )
    issued = issue_certificate(ca, csr, "auditor", out=tmp_path / "beta.pem")
    assert verify(issued.path, ca).org == "beta"


class _Outcome:
    def __init__(self) -> None:
        self.peer: Any = None
        self.error: BaseException | None = None


def _tls_exchange(
    ca: Path, server: Member, client: Member | None, check_crl: bool = True
) -> tuple[_Outcome, _Outcome]:
    """One mutual-TLS round trip on 127.0.0.1, as the Consortium API would do it."""
    strict = ssl.VERIFY_X509_STRICT
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    server_ctx.load_verify_locations(cafile=ca / CA_CERT)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.verify_flags |= strict
    if check_crl:
        server_ctx.load_verify_locations(cafile=ca / CA_CRL)
        server_ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cafile=ca / CA_CERT)
    client_ctx.verify_flags |= strict
    if client is not None:
        client_ctx.load_cert_chain(client.cert, client.key)

    s_out, c_out = _Outcome(), _Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                s_out.peer = identity_of(x509.load_der_x509_certificate(der))
                tls.sendall(b"ok")
        except BaseException as err:
            s_out.error = err

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            c_out.peer = identity_of(x509.load_der_x509_certificate(der))
            assert tls.recv(2) == b"ok"  # TLS 1.3: a refused client cert shows up here
    except BaseException as err:
        c_out.error = err
    finally:
        thread.join(20)
        listener.close()
    return s_out, c_out


def test_mutual_tls_with_python_ssl(ca: Path, tmp_path: Path, members: dict[str, Member]) -> None:
    server, c = _tls_exchange(ca, members["operator"], members["owner"])
    assert server.error is None and c.error is None, (server.error, c.error)
    assert (server.peer.org, server.peer.role) == (members["owner"].org, "owner")
    assert c.peer.role == "operator"

    # no client certificate, a stranger's, a revoked one: the server refuses the handshake
    stranger_ca = init_ca(tmp_path / "stranger", "Consortium CA").cert.parent
    stranger = make_member(stranger_ca, tmp_path / "s", "acme", "owner")
    revoke(ca, members["auditor"].cert)
    for client, reason in [
        (None, "did not return a certificate"),
        (stranger, "certificate verify failed"),
        (members["auditor"], "revoked"),
    ]:
        server, c = _tls_exchange(ca, members["operator"], client)
        assert isinstance(server.error, ssl.SSLError), server.error
        assert reason in str(server.error)
        assert server.peer is None

    # an owner certificate cannot serve TLS (no serverAuth)
    server, c = _tls_exchange(ca, members["owner"], members["operator"])
    assert isinstance(c.error, ssl.SSLCertVerificationError)
    assert "purpose" in str(c.error)


def test_mutual_tls_with_grpc(ca: Path, members: dict[str, Member]) -> None:
    grpc = pytest.importorskip("grpc")
    seen: list[Any] = []

    def whoami(request: bytes, context: Any) -> bytes:
        pem = context.auth_context()["x509_pem_cert"][0]
        ident = identity_of(x509.load_pem_x509_certificate(pem))
        seen.append(ident)
        return f"{ident.org}/{ident.role}".encode()

    handler = grpc.method_handlers_generic_handler(
        "flexfed.test.v1.Probe", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    op, owner = members["operator"], members["owner"]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(op.key.read_bytes(), op.cert.read_bytes())],
        root_certificates=(ca / CA_CERT).read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        channel_creds = grpc.ssl_channel_credentials(
            root_certificates=(ca / CA_CERT).read_bytes(),
            private_key=owner.key.read_bytes(),
            certificate_chain=owner.cert.read_bytes(),
        )
        with grpc.secure_channel(f"127.0.0.1:{port}", channel_creds) as channel:
            call = channel.unary_unary("/flexfed.test.v1.Probe/WhoAmI")
            assert call(b"", timeout=10) == f"{owner.org}/owner".encode()
    finally:
        server.stop(None)
    assert seen[0].role == "owner"
