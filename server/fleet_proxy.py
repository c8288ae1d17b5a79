"""A TLS reverse proxy that exposes only the Flower Fleet API of a SuperLink.

Flower 1.42's ``flower-superlink`` serves the Fleet API (SuperNodes: ``POST /v1/fleet/<rpc>``,
protobuf over HTTP/1.1 with httpx), the Control API (``flwr run``, ``flwr supernode register``,
``flwr ls``: ``POST /v1/control/<rpc>``, unauthenticated in open-source Flower), the Runtime
API (``/v1/runtime/...``), ``/health`` and FastAPI's ``/docs`` on one HTTPS port. This proxy
listens where data owners connect and forwards only

- ``POST /v1/fleet/<name>`` (``name``: lowercase letters, digits and dashes; no query), and
- ``GET``/``HEAD /health``

to the SuperLink's private address over TLS, verifying the SuperLink's certificate against the
consortium CA. Everything else is answered 403 without contacting the SuperLink, and logged
(one line per refused request). The allow-list is exact on the raw request target, so encoded
or dot-segment tricks (``/v1/fleet/%2e%2e/control/...``, ``/v1/fleet/../control/...``) and
absolute-form targets are refused too.

Bodies are streamed both ways in 64 KiB pieces (never buffered whole); request bodies larger
than ``max_body_bytes`` are refused (413). One upstream TLS connection per forwarded request;
client connections are HTTP/1.1 keep-alive. Standard library only.
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FLEET_PATH = re.compile(r"/v1/fleet/[a-z0-9][a-z0-9-]{0,63}")
HEALTH_PATH = "/health"
CHUNK = 64 * 1024
DEFAULT_MAX_BODY = 1 << 30  # Flower chunks large objects; this only bounds a single request
# RFC 9110 7.6.1 plus the ones every proxy drops.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-real-ip",
    }
)
_DRAIN_LIMIT = 1 << 20  # read (and drop) at most this much of a refused request's body


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def allowed(method: str, target: str) -> bool:
    """Whether the request goes to the SuperLink (the raw request target, exact match)."""
    if method == "POST":
        return FLEET_PATH.fullmatch(target) is not None
    if method in ("GET", "HEAD"):
        return target == HEALTH_PATH
    return False


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    context: ssl.SSLContext
    server_name: str
    timeout: float

    def connect(self) -> http.client.HTTPSConnection:
        conn = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout, context=self.context
        )
        # NOTE: http.client uses the host for SNI and the hostname check; --server-name
        # overrides both when the SuperLink's certificate names another host than we dial.
        if self.server_name != self.host:
            sock = socket.create_connection((self.host, self.port), self.timeout)
            try:
                conn.sock = self.context.wrap_socket(sock, server_hostname=self.server_name)
            except BaseException:
                sock.close()
                raise
        return conn


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FleetProxy

    # --- dispatch ----------------------------------------------------------------------------

    def handle_expect_100(self) -> bool:
        if not allowed(self.command, self.path):
            self._refuse()
            return False
        return super().handle_expect_100()

    def _dispatch(self) -> None:
        if not allowed(self.command, self.path):
            self._refuse()
            return
        try:
            self._forward()
        except _ClientGone:
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _dispatch
    do_OPTIONS = do_CONNECT = do_TRACE = _dispatch

    # --- refusing ----------------------------------------------------------------------------

    def _refuse(self, status: int = 403, why: str = "not a Fleet API request") -> None:
        log.warning(
            "fleet-proxy: refused %s %r from %s: %d %s",
            self.command,
            self.path[:200],
            self.client_address[0],
            status,
            why,
        )
        self._drain()
        self._reply(status, f"{why}: this address serves only the Flower Fleet API\n")

    def _drain(self) -> None:
        """Read a small refused body so the client sees the answer rather than a reset."""
        length = self.headers.get("Content-Length", "")
        if "Transfer-Encoding" in self.headers or not length.isdigit():
            self.close_connection = True
            return
        size = int(length)
        if size > _DRAIN_LIMIT:
            self.close_connection = True
            return
        try:
            while size > 0:
                got = self.rfile.read(min(size, CHUNK))
                if not got:
                    break
                size -= len(got)
        except OSError:
            pass
        self.close_connection = True

    def _reply(self, status: int, text: str) -> None:
        body = text.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True

    # --- forwarding --------------------------------------------------------------------------

    def _request_body(self) -> tuple[Iterator[bytes] | None, dict[str, str]] | None:
        """The body as pieces to send upstream and its framing header; None: refused."""
        encoding = self.headers.get("Transfer-Encoding")
        length = self.headers.get("Content-Length")
        limit = self.server.max_body_bytes
        if encoding is not None:
            if length is not None or encoding.strip().lower() != "chunked":
                self._refuse(400, "bad request framing")
                return None
            return self._chunked(limit), {"Transfer-Encoding": "chunked"}
        if length is None:
            return None, {"Content-Length": "0"} if self.command == "POST" else {}
        if not length.isdigit():
            self._refuse(400, "bad Content-Length")
            return None
        size = int(length)
        if size > limit:
            self._refuse(413, f"request body over {limit} bytes")
            return None
        return self._fixed(size), {"Content-Length": str(size)}

    def _fixed(self, size: int) -> Iterator[bytes]:
        while size > 0:
            piece = self._read(min(size, CHUNK))
            size -= len(piece)
            yield piece

    def _chunked(self, limit: int) -> Iterator[bytes]:
        """Decode the client's chunked body, yield it re-framed as chunks (then the last one)."""
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line.endswith(b"\n"):
                raise _ClientGone("bad chunk header")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _ClientGone("bad chunk header") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # NOTE: trailers are dropped
                yield b"0\r\n\r\n"
                return
            total += size
            if total > limit:
                raise _ClientGone(f"chunked request body over {limit} bytes")
            left = size
            while left > 0:
                piece = self._read(min(left, CHUNK))
                left -= len(piece)
                yield b"%x\r\n%s\r\n" % (len(piece), piece)
            self.rfile.readline(8)

    def _read(self, n: int) -> bytes:
        try:
            piece = self.rfile.read(n)
        except OSError as e:
            raise _ClientGone(str(e)) from e
        if not piece:
            raise _ClientGone("client closed mid-body")
        return piece

    def _forward(self) -> None:
        framed = self._request_body()
        if framed is None:
            return
        body, framing = framed
        upstream = self.server.upstream
        conn: http.client.HTTPSConnection | None = None
        try:
            try:
                conn = upstream.connect()
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                conn.putheader("Host", f"{upstream.server_name}:{upstream.port}")
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        conn.putheader(name, value)
                conn.putheader("X-Forwarded-For", self.client_address[0])
                conn.putheader("X-Forwarded-Proto", "https")
                for name, value in framing.items():
                    conn.putheader(name, value)
                conn.endheaders()
                for piece in body or ():
                    conn.send(piece)
                response = conn.getresponse()
            except _ClientGone:
                raise
            except (OSError, http.client.HTTPException, ValueError) as e:
                log.warning(
                    "fleet-proxy: %s %s from %s: SuperLink unreachable: %s",
                    self.command,
                    self.path,
                    self.client_address[0],
                    e,
                )
                self._reply(502, "the SuperLink is unreachable")
                return
            self._relay(response)
            log.debug(
                "fleet-proxy: forwarded %s %s from %s: %d",
                self.command,
                self.path,
                self.client_address[0],
                response.status,
            )
        finally:
            if conn is not None:
                conn.close()

    def _relay(self, response: http.client.HTTPResponse) -> None:
        """Send the SuperLink's answer back, streaming its body."""
        no_body = self.command == "HEAD" or response.status in (204, 304) or response.status < 200
        length = response.getheader("Content-Length")
        chunked = not no_body and (response.chunked or length is None)
        if chunked and self.request_version != "HTTP/1.1":
            self.close_connection = True  # HTTP/1.0: the body ends when the connection does
        try:
            self.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            if length is not None and not response.chunked:
                self.send_header("Content-Length", length)
            elif chunked and not self.close_connection:
                self.send_header("Transfer-Encoding", "chunked")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if no_body:
                return
            while piece := response.read1(CHUNK):
                if chunked and not self.close_connection:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    self.wfile.write(piece)
            if chunked and not self.close_connection:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, http.client.HTTPException) as e:
            # NOTE: headers may be out already; all we can do is cut the connection.
            self.close_connection = True
            log.warning("fleet-proxy: %s %s: relay cut: %s", self.command, self.path, e)

    # --- logging -----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("fleet-proxy: %s " + format, self.client_address[0], *args)

    def log_error(self, format: str, *args: Any) -> None:
        # NOTE: malformed requests (bad request line, too many headers) never reach _dispatch.
        level = logging.DEBUG if format.startswith("Request timed out") else logging.WARNING
        log.log(level, "fleet-proxy: refused from %s: " + format, self.client_address[0], *args)


class _ClientGone(Exception):
    """The client's connection broke, or its body was malformed, mid-request."""


class FleetProxy(ThreadingHTTPServer):
    """``server_forever()`` until ``shutdown()``; TLS handshakes happen in the worker threads."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        listen: tuple[str, int],
        upstream: Upstream,
        server_context: ssl.SSLContext,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        max_connections: int = 256,
        client_timeout: float = 120.0,
    ) -> None:
        self.upstream = upstream
        self.server_context = server_context
        self.max_body_bytes = max_body_bytes
        self.client_timeout = client_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        if ":" in listen[0]:
            self.address_family = socket.AF_INET6
        super().__init__(listen, _Handler)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else str(host)
        return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("fleet-proxy: refused a connection from %s: too many", client_address[0])
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.client_timeout)
            try:
                tls = self.server_context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as e:
                log.debug("fleet-proxy: TLS handshake with %s failed: %s", client_address[0], e)
                self.shutdown_request(request)
                return
            super().process_request_thread(tls, client_address)
        finally:
            self._slots.release()


def make_proxy(
    listen: str,
    superlink: str,
    cert: Path,
    key: Path,
    ca: Path,
    server_name: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    upstream_timeout: float = 300.0,
) -> FleetProxy:
    """Bind the proxy (port 0 picks a free one: see ``FleetProxy.address``)."""
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.minimum_version = ssl.TLSVersion.TLSv1_2
    server_context.load_cert_chain(cert, key)
    server_context.set_alpn_protocols(["http/1.1"])
    client_context = ssl.create_default_context(cafile=str(ca))
    client_context.minimum_version = ssl.TLSVersion.TLSv1_2
    host, port = split_address(superlink)
    upstream = Upstream(host, port, client_context, server_name or host, upstream_timeout)
    return FleetProxy(
        split_address(listen), upstream, server_context, max_body_bytes=max_body_bytes
    )


def serve(
    listen: str,
    superlink: str,
    cert: Path,
    key: Path,
    ca: Path,
    server_name: str | None = None,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    on_start: Callable[[str], None] = print,
) -> None:
    """Run the proxy until SIGTERM/SIGINT."""
    import signal

    proxy = make_proxy(listen, superlink, cert, key, ca, server_name, max_body_bytes=max_body_bytes)

    def stop(signum: int, _frame: object) -> None:
        threading.Thread(target=proxy.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with proxy:
        on_start(
            f"fleet-proxy serving on {proxy.address}: /v1/fleet/* and /health -> "
            f"https://{superlink} (verified as {proxy.upstream.server_name}); everything else 403"
        )
        proxy.serve_forever()
