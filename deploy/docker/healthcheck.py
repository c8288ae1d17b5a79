"""Health probe for the flexfed containers (docker compose healthcheck, Kubernetes exec probes).

    python healthcheck.py grpc  HOST:PORT --ca CA --cert CERT --key KEY [--service NAME]
    python healthcheck.py https HOST:PORT --ca CA --cert CERT [--path /health]

``grpc``: the coordinator's ``grpc.health.v1.Health`` over its mutual-TLS port (Kubernetes'
built-in ``grpc`` probe speaks plaintext only, so it cannot reach an mTLS server). ``https``:
the Flower SuperLink's ``GET /health``. Both verify the server against the consortium CA and
check the name the server's own certificate (CERT) carries, so the probe also fails when the
mounted certificate and the serving one disagree. Exit 0 when serving, 1 otherwise.
Needs only grpcio, grpcio-health-checking and cryptography (all in the flexfed image).
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
from pathlib import Path

from cryptography import x509


def server_name(cert: Path) -> str:
    """The first DNS (else IP) SAN of the certificate the server presents."""
    parsed = x509.load_pem_x509_certificate(cert.read_bytes())
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName) or [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]
    if not names:
        raise SystemExit(f"unhealthy: {cert} names no DNS or IP address")
    return names[0]


def check_grpc(address: str, ca: Path, cert: Path, key: Path, service: str, timeout: float) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=cert.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", server_name(cert))]
    with grpc.secure_channel(address, creds, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError(status)
    return status


def check_https(address: str, ca: Path, cert: Path, path: str, timeout: float) -> str:
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name(cert)) as tls,
    ):
        tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status_line = tls.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split()
    if len(parts) < 2 or parts[1] != "200":
        raise RuntimeError(status_line or "no answer")
    return status_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["grpc", "https"])
    parser.add_argument("address", help="HOST:PORT")
    parser.add_argument("--ca", type=Path, required=True, help="the consortium CA certificate")
    parser.add_argument("--cert", type=Path, required=True, help="the server's certificate")
    parser.add_argument("--key", type=Path, help="grpc: the client key (mutual TLS)")
    parser.add_argument("--service", default="", help="grpc: a service name ('' = overall)")
    parser.add_argument("--path", default="/health", help="https: the path to GET")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    try:
        if args.kind == "grpc":
            if args.key is None:
                parser.error("grpc needs --key")
            result = check_grpc(
                args.address, args.ca, args.cert, args.key, args.service, args.timeout
            )
        else:
            result = check_https(args.address, args.ca, args.cert, args.path, args.timeout)
    except Exception as err:  # a probe reports, it does not crash
        print(f"unhealthy: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"healthy: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
