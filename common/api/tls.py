"""Mutual TLS for the Consortium API: credentials from the consortium CA's PEM files.

Both sides present a certificate issued by the consortium CA (P-256, see docs/pki.md) and
trust only that CA. The server requires a client certificate; :mod:`flexfed.server.auth`
then decides what the caller's role may do.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from flexfed.common.errors import MissingFileError

# Messages carry at most one chunk (1 MiB by default) plus framing; 8 MiB leaves headroom
# for a server that allows larger chunks, and bounds what one message can cost in memory.
MAX_MESSAGE_BYTES = 8 << 20
CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
]


def _read(path: Path | str, what: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{what} {p} does not exist")
    return p.read_bytes()


def server_credentials(cert: Path | str, key: Path | str, ca: Path | str) -> grpc.ServerCredentials:
    """The coordinator's TLS identity; clients must present a certificate the CA issued."""
    return grpc.ssl_server_credentials(
        [(_read(key, "TLS key"), _read(cert, "TLS certificate"))],
        root_certificates=_read(ca, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(
    ca: Path | str, cert: Path | str, key: Path | str
) -> grpc.ChannelCredentials:
    """A member's client credentials: its certificate and key, trusting only the CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "CA certificate"),
        private_key=_read(key, "private key"),
        certificate_chain=_read(cert, "certificate"),
    )


def secure_channel(
    address: str,
    ca: Path | str,
    cert: Path | str,
    key: Path | str,
    *,
    server_name: str | None = None,
) -> grpc.Channel:
    """A channel to the coordinator at ``address`` (``host:port``) over mutual TLS.

    ``server_name`` overrides the name checked against the server certificate (its SAN), for
    a coordinator reached by an address its certificate does not name.
    """
    options: list[tuple[str, int | str]] = list(CHANNEL_OPTIONS)
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, channel_credentials(ca, cert, key), options=options)
