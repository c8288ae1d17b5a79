"""``flexfed coordinator ...``: the operator runs the coordinator (the Consortium API server).

    flexfed coordinator init DIR --ca-cert ca.pem [--crl crl.pem] --tls-cert CERT --tls-key KEY
                             --anchor ANCHOR_DIR [--listen 127.0.0.1:50051] [--database URL]
    flexfed coordinator serve DIR [--listen HOST:PORT]
    flexfed coordinator check DIR
    flexfed coordinator fleet-proxy --listen HOST:PORT --superlink HOST:PORT --cert CERT
                                    --key KEY --ca CA [--server-name NAME]

``init`` makes the coordinator directory (registry, transparency log and its key, artifact
store, the published anchor); ``serve`` runs the server until SIGTERM or Ctrl-C; ``check``
verifies that registry, store and log agree, one line per problem (exit 1 on any);
``fleet-proxy`` exposes only the Flower SuperLink's Fleet API to data owners (docs/flower.md).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from flexfed.common.cli.options import connection_options, parse_size
from flexfed.common.trust.log_events import open_log

_PATH = click.Path(path_type=Path)


@click.group("coordinator")
def group() -> None:
    """Operator: create, run and check the coordinator (registry, log, artifact store)."""


@group.command("init")
@click.argument("directory", type=_PATH)
@click.option("--ca-cert", required=True, type=_PATH, help="The consortium CA certificate.")
@click.option("--crl", type=_PATH, help="The CA's CRL (re-read whenever it changes).")
@click.option("--tls-cert", required=True, type=_PATH, help="The coordinator's operator cert.")
@click.option("--tls-key", required=True, type=_PATH, help="Its private key.")
@click.option("--anchor", "anchor_dir", required=True, type=_PATH, help="The anchor to publish.")
@click.option("--listen", default="127.0.0.1:50051", show_default=True, help="HOST:PORT.")
@click.option(
    "--database",
    default="sqlite:///registry.db",
    show_default=True,
    help="Registry SQLAlchemy URL; a relative SQLite path is inside DIRECTORY.",
)
@click.option("--origin", help="The log's name in its checkpoints (default: a random one).")
@click.option(
    "--max-artifact-size", default="64GiB", show_default=True, help="Largest upload accepted."
)
@click.option("--workers", default=16, show_default=True, type=int, help="Threads serving calls.")
def init(
    directory: Path,
    ca_cert: Path,
    crl: Path | None,
    tls_cert: Path,
    tls_key: Path,
    anchor_dir: Path,
    listen: str,
    database: str,
    origin: str | None,
    max_artifact_size: str,
    workers: int,
) -> None:
    """Create a coordinator directory and publish the anchor."""
    from flexfed.server.config import Limits
    from flexfed.server.coordinator import init_coordinator

    config = init_coordinator(
        directory,
        ca_cert=ca_cert,
        crl=crl,
        tls_cert=tls_cert,
        tls_key=tls_key,
        anchor_dir=anchor_dir,
        listen=listen,
        database=database,
        origin=origin,
        limits=Limits(max_artifact_bytes=parse_size(max_artifact_size), workers=workers),
    )
    click.echo(
        f"created coordinator {config.root}: anchor {config.anchor.digest[:16]}... published as "
        f"{config.anchor.artifact_digest}; log {config.log_origin!r} (public key "
        f"{config.log_public_key}); start it with `flexfed coordinator serve {directory}`"
    )


def _service_logging() -> None:
    """A long-running service logs flexfed.server at INFO at least (more with --verbose)."""
    server = logging.getLogger("flexfed.server")
    if server.getEffectiveLevel() > logging.INFO:
        server.setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")


def _started(line: str) -> None:
    """Print a service's start line at once (tests and scripts wait for it)."""
    click.echo(line)
    sys.stdout.flush()


@group.command("serve")
@click.argument("directory", type=_PATH)
@click.option("--listen", help="HOST:PORT to listen on instead of the configured one.")
def serve(directory: Path, listen: str | None) -> None:
    """Run the coordinator until SIGTERM or Ctrl-C (in-flight calls may finish)."""
    from flexfed.server.app import serve as run
    from flexfed.server.config import load_config

    # NOTE: the operator wants the start line and recovery warnings even without --verbose.
    _service_logging()
    run(load_config(directory), listen=listen, on_start=_started)


@group.command("check")
@click.argument("directory", type=_PATH)
@click.option("--skip-anchor", is_flag=True, help="Do not re-hash the anchor copy.")
def check(directory: Path, skip_anchor: bool) -> None:
    """Verify that registry, store and log agree; one line per problem, exit 1 on any."""
    from flexfed.common.translog.filelog import LogLockedError
    from flexfed.server.config import load_config
    from flexfed.server.consistency import check as run_check
    from flexfed.server.coordinator import Coordinator

    config = load_config(directory)
    with tempfile.TemporaryDirectory(prefix="flexfed-check-") as tmp:
        try:
            log = open_log(config.log_file)
        except LogLockedError:
            # NOTE: a serving coordinator holds the log's writer lock; read a copy of it.
            copy = Path(tmp) / config.log_file.name
            shutil.copyfile(config.log_file, copy)
            log = open_log(copy)
        with Coordinator(config, log=log) as coordinator:
            problems = run_check(coordinator, anchor=not skip_anchor)
            experts, size = len(coordinator.registry.experts()), coordinator.log.size
    for line in problems:
        click.echo(line)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {config.root}", err=True)
        raise click.exceptions.Exit(1)
    click.echo(f"{config.root}: registry, store and log agree ({experts} experts, {size} entries)")


@group.command("fleet-proxy")
@click.option("--listen", required=True, help="HOST:PORT data owners' SuperNodes dial.")
@click.option("--superlink", required=True, help="The SuperLink's private HOST:PORT.")
@click.option("--cert", required=True, type=_PATH, help="TLS certificate shown to SuperNodes.")
@click.option("--key", required=True, type=_PATH, help="Its private key.")
@click.option("--ca", required=True, type=_PATH, help="CA that verifies the SuperLink's cert.")
@click.option("--server-name", help="Name checked in the SuperLink's cert (default: its host).")
@click.option(
    "--max-body-size", default="1GiB", show_default=True, help="Largest request body forwarded."
)
def fleet_proxy(
    listen: str,
    superlink: str,
    cert: Path,
    key: Path,
    ca: Path,
    server_name: str | None,
    max_body_size: str,
) -> None:
    """Expose only the SuperLink's Fleet API (and /health); answer everything else 403."""
    from flexfed.server.fleet_proxy import serve as run

    # NOTE: refused requests are warnings; forwarded ones are logged with --verbose.
    _service_logging()

    run(
        listen,
        superlink,
        cert,
        key,
        ca,
        server_name,
        max_body_bytes=parse_size(max_body_size),
        on_start=_started,
    )


# --- administering a running coordinator (as the operator, over mutual TLS) ---------------


def _operator_client(
    address: str | None, ca: Path | None, cert: Path | None, key: Path | None
) -> Any:
    from flexfed.common.api.consortium import Connection, ConsortiumClient

    return ConsortiumClient(Connection.resolve(address, ca, cert, key), timeout=1800.0)


@group.command("release")
@connection_options
@click.option("--expert", "experts", multiple=True, help="Expert ids (default: every accepted).")
@click.option("--top-k", default=0, type=int, help="Experts active per token (0: the default).")
def release(
    address: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    experts: tuple[str, ...],
    top_k: int,
) -> None:
    """Assemble, log and sign a new model version from the accepted experts."""
    with _operator_client(address, ca, cert, key) as client:
        r = client.release(list(experts), top_k)
    click.echo(
        f"release {r.version}: {len(r.expert_ids)} experts, top-{r.top_k}, model "
        f"{r.model_artifact_digest}, log entry {r.log_index}"
    )


@group.command("revoke")
@connection_options
@click.argument("expert_id")
@click.option("--reason", required=True, help="Why (recorded in the log).")
def revoke(
    address: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    expert_id: str,
    reason: str,
) -> None:
    """Withdraw EXPERT_ID for good: later releases leave it out; audits flag it."""
    with _operator_client(address, ca, cert, key) as client:
        answer = client.revoke(expert_id, reason)
    click.echo(f"revoked {expert_id}, log entry {answer.log_index}")
