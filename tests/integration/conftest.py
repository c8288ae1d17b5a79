"""Integration fixtures: a consortium PKI and real gRPC servers with mutual TLS on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest
from consortium import Consortium, Member, Pki

from flexfed.common.pki import generate_key_and_csr, issue_certificate
from flexfed.common.tls import CHANNEL_OPTIONS, server_credentials


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Consortium:
    pki = Pki(tmp_path_factory.mktemp("consortium"))
    out = pki.root / "members" / "server"
    req = generate_key_and_csr("consortium", out, "operator")
    cert = issue_certificate(
        pki.ca_dir,
        req.csr,
        "operator",
        out=out / "cert.pem",
        san_dns=["localhost"],
        san_ip=["127.0.0.1"],
    )
    server = Member("consortium", "operator", req.key, cert.path)
    return Consortium(
        pki=pki,
        server=server,
        operator=pki.member("consortium", "operator", name="operator"),
        acme=pki.member("acme"),
        globex=pki.member("globex"),
        auditor=pki.member("audit-co", "auditor"),
    )


Adder = Callable[[grpc.Server], None]


@pytest.fixture
def serve(consortium: Consortium) -> Iterator[Callable[..., str]]:
    """Start a real gRPC server on 127.0.0.1 with mTLS; returns its ``host:port``.

    ``serve(add1, add2, ...)``: each ``add`` registers a servicer, e.g.
    ``lambda s: artifact_pb2_grpc.add_ArtifactServiceServicer_to_server(servicer, s)``.
    """
    servers: list[grpc.Server] = []

    def start(*adders: Adder, workers: int = 8) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(workers), options=CHANNEL_OPTIONS)
        for add in adders:
            add(server)
        creds = server_credentials(
            consortium.server.cert, consortium.server.key, consortium.pki.ca_pem
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)
