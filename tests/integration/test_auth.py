"""Mutual TLS and roles on a real gRPC server: who may call, and the status when refused."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from consortium import Consortium, Pki

from flexfed.common.api.tls import CHANNEL_OPTIONS
from flexfed.common.trust.ca import revoke
from flexfed.proto.v1 import audit_pb2, audit_pb2_grpc
from flexfed.server.auth import Authorizer

pytestmark = pytest.mark.integration


class Probe(audit_pb2_grpc.AuditServiceServicer):
    """A servicer whose methods only check roles: readers may GetLogKey, the operator
    alone may GetEntries (standing in for a write)."""

    def __init__(self, authorizer: Authorizer) -> None:
        self.auth = authorizer

    def GetLogKey(self, request: audit_pb2.GetLogKeyRequest, context: grpc.ServicerContext):
        caller = self.auth.require(context, "owner", "auditor")
        return audit_pb2.LogKey(origin=f"{caller.org}/{caller.role}")

    def GetEntries(self, request: audit_pb2.GetEntriesRequest, context: grpc.ServicerContext):
        self.auth.require(context)
        return audit_pb2.GetEntriesResponse(start=request.start)


@pytest.fixture
def address(consortium: Consortium, serve: Callable[..., str]) -> str:
    probe = Probe(consortium.authorizer())
    return serve(lambda s: audit_pb2_grpc.add_AuditServiceServicer_to_server(probe, s))


def test_members_are_identified_by_their_certificates(consortium: Consortium, address: str) -> None:
    for member, expected in [
        (consortium.acme, "acme/owner"),
        (consortium.auditor, "audit-co/auditor"),
        (consortium.operator, "consortium/operator"),
    ]:
        stub = audit_pb2_grpc.AuditServiceStub(consortium.channel(address, member))
        assert stub.GetLogKey(audit_pb2.GetLogKeyRequest(), timeout=10).origin == expected


def test_a_role_that_may_not_call_gets_permission_denied(
    consortium: Consortium, address: str
) -> None:
    for member in (consortium.acme, consortium.auditor):
        stub = audit_pb2_grpc.AuditServiceStub(consortium.channel(address, member))
        with pytest.raises(grpc.RpcError) as err:
            stub.GetEntries(audit_pb2.GetEntriesRequest(start=1), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    op = audit_pb2_grpc.AuditServiceStub(consortium.channel(address, consortium.operator))
    assert op.GetEntries(audit_pb2.GetEntriesRequest(start=1), timeout=10).start == 1


def test_no_client_certificate_is_refused_by_tls(consortium: Consortium, address: str) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=consortium.pki.ca_pem.read_bytes())
    channel = grpc.secure_channel(address, creds, options=CHANNEL_OPTIONS)
    with pytest.raises(grpc.RpcError) as err:
        audit_pb2_grpc.AuditServiceStub(channel).GetLogKey(audit_pb2.GetLogKeyRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused_by_tls(
    consortium: Consortium, address: str, tmp_path
) -> None:
    rogue = Pki(tmp_path / "rogue").member("acme")
    channel = grpc.secure_channel(
        address,
        grpc.ssl_channel_credentials(
            consortium.pki.ca_pem.read_bytes(), rogue.key.read_bytes(), rogue.cert.read_bytes()
        ),
        options=CHANNEL_OPTIONS,
    )
    with pytest.raises(grpc.RpcError) as err:
        audit_pb2_grpc.AuditServiceStub(channel).GetLogKey(audit_pb2.GetLogKeyRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_revoked_certificate_is_refused_once_the_crl_says_so(
    consortium: Consortium, address: str
) -> None:
    member = consortium.pki.member("initech")
    stub = audit_pb2_grpc.AuditServiceStub(consortium.channel(address, member))
    assert stub.GetLogKey(audit_pb2.GetLogKeyRequest(), timeout=10).origin == "initech/owner"
    revoke(consortium.pki.ca_dir, member.cert, "key-compromise")  # rewrites ca/crl.pem
    fresh = audit_pb2_grpc.AuditServiceStub(consortium.channel(address, member))
    with pytest.raises(grpc.RpcError) as err:
        fresh.GetLogKey(audit_pb2.GetLogKeyRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "revoked" in (err.value.details() or "")
