"""The network demo's parties and state: who holds which credentials, and the Flower App it runs.

:mod:`flexfed.server.demo.network` runs the flow; this module holds what the flow passes
around (credentials, owners, the PKI, the running network) and the small builders it uses (the
Flower App's files and run config, the environment of each party's processes).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flexfed.common.flower.campaign import CampaignConfig
from flexfed.common.trust.ca import issue_certificate
from flexfed.common.trust.keys import generate_key_and_csr
from flexfed.server.demo.local import (
    THREADS_PER_PROCESS,
)
from flexfed.server.demo.processes import (
    ServiceError,
    Services,
)

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live here
CONNECTION = "consortium"  # the `flwr` CLI's name for the SuperLink
LOG_ORIGIN = "demo.flexfed.local/log"
CAMPAIGN_TIMEOUT = 1800.0  # seconds for a whole campaign
NODE_WAIT = 120.0  # seconds the ServerApp waits for all SuperNodes to connect


class NetworkDemoError(ServiceError):
    """A step of the network demo failed (the message holds the relevant log's tail)."""


@contextmanager
def quiet_logger(logger: str) -> Iterator[None]:
    """The block without ``logger``'s warnings."""
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def environment(flwr_home: Path, **extra: str) -> dict[str, str]:
    """A process's environment: one thread, its own FLWR_HOME (as on separate machines)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLEXFED_")  # the demo passes every connection setting itself
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        OMP_NUM_THREADS=str(THREADS_PER_PROCESS),
        FLWR_HOME=str(flwr_home),
        # NOTE: as deploy/flower/*.sh: no telemetry, no update checks
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
    )
    env.update(extra)
    return env


def flexfed_cli(*args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "flexfed.common.cli", *args]


# --- the Flower App ------------------------------------------------------------------------


def write_flower_app(out: Path) -> Path:
    """The flexfed Flower App project (deploy/flower-app's pyproject.toml), for ``flwr run``.

    Written here rather than read from the repository so an installed flexfed runs the demo
    too; the settings table comes from :class:`CampaignConfig` (one source for the keys).
    """
    defaults = {f.name.replace("_", "-"): f.default for f in fields(CampaignConfig)}
    defaults["consortium-address"] = "127.0.0.1:7443"  # run config values must not be empty
    config = "\n".join(f"{k} = {_toml(v)}" for k, v in defaults.items())
    out.mkdir(parents=True, exist_ok=True)
    (out / "pyproject.toml").write_text(
        f"""# The flexfed Flower App, as in deploy/flower-app (written by `flexfed demo --network`).
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "flexfed-campaigns"
version = "0.1.0"
description = "flexfed campaigns: train FlexOlmo experts and evaluate releases on owners' nodes"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43", "flexfed"]

[tool.flwr.app]
publisher = "flexfed"

[tool.flwr.app.components]
serverapp = "flexfed.server.flower_app:app"
clientapp = "flexfed.client.flower_app:app"

[tool.flwr.app.config]
{config}
"""
    )
    return out


def _toml(value: Any) -> str:
    """A TOML scalar (strings as JSON strings: TOML basic strings use the same escapes)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)  # ints, and floats (repr always has a "." or an exponent)


def run_config(settings: dict[str, Any]) -> str:
    """``flwr run --run-config``: space-separated ``key=value`` in TOML."""
    return " ".join(f"{k}={_toml(v)}" for k, v in settings.items())


# --- the parties ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Owner:
    org: str
    domain: str
    home: Path
    creds: Credentials
    ca: Path
    data: Path


def issue(
    ca_dir: Path,
    org: str,
    role: str,
    out: Path,
    san_dns: tuple[str, ...] = (),
    san_ip: tuple[str, ...] = (),
) -> Credentials:
    """A key made in ``out`` (it never leaves) and the CA's certificate for it."""
    req = generate_key_and_csr(org, out, role)
    cert = issue_certificate(
        ca_dir, req.csr, role, out=out / "cert.pem", san_dns=san_dns, san_ip=san_ip
    )
    return Credentials(cert.path, req.key)


def member_env(address: str, ca: Path, creds: Credentials, flwr_home: Path) -> dict[str, str]:
    """A member's connection to the Consortium API, as the variables it would export."""
    return environment(
        flwr_home,
        FLEXFED_COORDINATOR=address,
        FLEXFED_CA=str(ca),
        FLEXFED_CERT=str(creds.cert),
        FLEXFED_KEY=str(creds.key),
    )


# --- the run's state -----------------------------------------------------------------------


@dataclass
class Laps:
    """Seconds per step, for ``network.json`` (``prepare`` counts from the demo's start)."""

    t0: float
    seconds: dict[str, float] = field(default_factory=dict)
    last: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.seconds["prepare"] = round(self.last - self.t0, 1)

    def done(self, step: str) -> None:
        now = time.monotonic()
        self.seconds[step] = round(now - self.last, 1)
        self.last = now


@dataclass(frozen=True)
class Pki:
    """The throwaway consortium CA and everyone's credentials."""

    ca_dir: Path
    ca: Path
    tls: Credentials  # the coordinator's and the SuperLink's server certificate
    admin: Credentials  # the operator's client certificate
    owners: tuple[Owner, ...]


@dataclass
class Network:
    """The running consortium as the operator sees it, and the releases made so far."""

    operator: Path
    services: Services
    pki: Pki
    coordinator_dir: Path
    address: str  # the Consortium API
    superlink: str
    op_env: dict[str, str]  # the operator's admin connection and `flwr` CLI configuration
    releases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.services.logs
