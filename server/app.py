"""The coordinator as a running gRPC server: wiring, startup recovery, graceful shutdown.

:func:`build_server` puts every Consortium API service (artifacts, registry, audit) and the
standard gRPC health service on one mTLS server; :func:`serve` is ``flexfed coordinator
serve``: it opens the coordinator, repairs what a crash left (store, then registry from the
log, then staging), serves, and on SIGTERM or SIGINT stops taking calls, gives in-flight ones
``limits.grace_seconds`` to finish, and closes the log and the registry.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flexfed.common.api.tls import CHANNEL_OPTIONS, server_credentials
from flexfed.common.errors import ConfigError
from flexfed.common.formats.bundle import max_bundle_bytes
from flexfed.proto.v1 import audit_pb2_grpc, registry_pb2_grpc
from flexfed.server.access import ReadPolicy
from flexfed.server.admission import StreamSlots
from flexfed.server.audit_service import AuditServicer
from flexfed.server.auth import Authorizer
from flexfed.server.config import CoordinatorConfig
from flexfed.server.consistency import collect_unsubmitted, recover
from flexfed.server.coordinator import Coordinator
from flexfed.server.registry_service import RegistryServicer
from flexfed.server.statuses import StatusInterceptor

logger = logging.getLogger(__name__)

SERVICE_NAMES = (
    "flexfed.proto.v1.ArtifactService",
    "flexfed.proto.v1.RegistryService",
    "flexfed.proto.v1.AuditService",
)


@dataclass
class CoordinatorServer:
    """A built (not yet started) server and what it is bound to."""

    server: grpc.Server
    port: int
    host: str
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self.server.start()

    def stop(self, grace: float | None) -> None:
        """Refuse new calls, let in-flight ones finish within ``grace`` seconds, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def _add_artifacts(server: grpc.Server, coordinator: Coordinator, auth: Authorizer) -> None:
    from flexfed.proto.v1 import artifact_pb2_grpc

    try:
        from flexfed.server.artifacts import ArtifactServicer
    except ImportError:  # pragma: no cover - only while the data plane is being built
        logger.warning("flexfed.server.artifacts is missing: serving without ArtifactService")
        return
    limits = coordinator.config.limits
    artifact_pb2_grpc.add_ArtifactServiceServicer_to_server(
        # FIX: stalled streams are cancelled after limits.stream_idle_seconds (see artifacts).
        ArtifactServicer(
            coordinator.store,
            auth,
            idle_seconds=limits.stream_idle_seconds,
            slots=StreamSlots(total=limits.transfer_streams, per_member=limits.streams_per_member),
            max_bundle_bytes=max_bundle_bytes(coordinator.anchor),
            # FIX (issue 12): any member downloaded any bundle, also after its owner left.
            may_read=ReadPolicy(coordinator).refusal,
            uploads_per_member=limits.uploads_per_member,
        ),
        server,
    )


def _private_paths(config: CoordinatorConfig) -> list[Path]:
    """Where the coordinator keeps its files: never named to a caller."""
    tls = config.tls
    files = [tls.ca_cert, tls.cert, tls.key, *([tls.crl] if tls.crl else [])]
    return [config.root, *(f.parent for f in files)]


def build_server(coordinator: Coordinator, *, listen: str | None = None) -> CoordinatorServer:
    """Every service on one server with mTLS, bound to ``listen`` (default: the config's).

    Port 0 binds a free port; :attr:`CoordinatorServer.port` says which.
    """
    config = coordinator.config
    address = listen or config.listen
    auth = Authorizer(config.tls.ca_cert, config.tls.crl)
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.limits.workers, thread_name_prefix="flexfed-rpc"
        ),
        options=CHANNEL_OPTIONS,
        # Calls beyond this are refused with RESOURCE_EXHAUSTED at once, not queued without
        # bound; transfer streams have their own, lower bounds (flexfed.server.admission).
        maximum_concurrent_rpcs=config.limits.max_concurrent_rpcs,
        # FIX (issue 12): unexpected errors reached callers as UNKNOWN with server paths and
        # database hosts in the text; every method now answers a precise, scrubbed status.
        interceptors=[StatusInterceptor(_private_paths(config))],
    )
    _add_artifacts(server, coordinator, auth)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(
        RegistryServicer(coordinator, auth), server
    )
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(coordinator, auth), server)
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    for name in ("", *SERVICE_NAMES):
        checker.set(name, health_pb2.HealthCheckResponse.SERVING)
    creds = server_credentials(config.tls.cert, config.tls.key, config.tls.ca_cert)
    try:
        port = server.add_secure_port(address, creds)
    except RuntimeError as err:
        raise ConfigError(f"cannot listen on {address}: {err}") from err
    if port == 0:
        raise ConfigError(f"cannot listen on {address} (in use, or not this machine's address)")
    return CoordinatorServer(server, port, address.rpartition(":")[0], checker)


def open_for_serving(config: CoordinatorConfig) -> Coordinator:
    """Open a coordinator and bring it to a consistent state (the startup recovery)."""
    coordinator = Coordinator(config)
    try:
        coordinator.check_anchor()
        for path in coordinator.store.recover():
            logger.warning("store recovery removed %s", path)
        recover(coordinator)
        collect_unsubmitted(coordinator)
        coordinator.clear_staging()
    except BaseException:
        coordinator.close()
        raise
    return coordinator


def serve(
    config: CoordinatorConfig,
    *,
    listen: str | None = None,
    on_start: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run the coordinator until SIGTERM/SIGINT (or ``stop`` is set); shut down gracefully."""
    stop = stop or threading.Event()
    coordinator = open_for_serving(config)
    try:
        built = build_server(coordinator, listen=listen)
        built.start()
        c = coordinator
        line = (
            f"flexfed coordinator serving on {built.address} (anchor "
            f"{config.anchor.digest[:12]}, {len(c.registry.experts())} experts, log size "
            f"{c.log.size})"
        )
        logger.info(line)
        if on_start is not None:
            on_start(line)

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            logger.info("received %s; shutting down", signal.Signals(signum).name)
            stop.set()

        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, request_stop)
        try:
            stop.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            built.stop(config.limits.grace_seconds)
            logger.info("flexfed coordinator stopped")
    finally:
        coordinator.close()
