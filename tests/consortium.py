"""Test support: a consortium CA in a temporary directory, and the members it certified.

Importable from every test (tests/ is on sys.path): ``from consortium import Pki``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import grpc

from flexfed.common.api.tls import secure_channel
from flexfed.common.trust.ca import init_ca, issue_certificate
from flexfed.common.trust.keys import generate_key_and_csr

if TYPE_CHECKING:
    from flexfed.server.auth import Authorizer


class Member(NamedTuple):
    org: str
    role: str
    key: Path
    cert: Path


@dataclass
class Pki:
    """A consortium CA in a temporary directory, and the members it certified."""

    root: Path
    name: str = "Consortium CA"

    def __post_init__(self) -> None:
        init_ca(self.root / "ca", self.name)

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_pem(self) -> Path:
        return self.ca_dir / "ca.pem"

    @property
    def crl_pem(self) -> Path:
        return self.ca_dir / "crl.pem"

    def member(
        self,
        org: str,
        role: str = "owner",
        *,
        name: str | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> Member:
        out = self.root / "members" / (name or f"{org}-{role}")
        req = generate_key_and_csr(org, out, role)
        issued = issue_certificate(
            self.ca_dir,
            req.csr,
            role,
            out=out / "cert.pem",
            not_before=not_before,
            not_after=not_after,
        )
        return Member(org, role, req.key, issued.path)


@dataclass
class Consortium:
    """A CA with an operator (also the server's TLS identity), two owners and an auditor."""

    pki: Pki
    server: Member  # operator certificate with SANs 127.0.0.1 and localhost
    operator: Member
    acme: Member  # owner
    globex: Member  # owner
    auditor: Member

    def authorizer(self) -> Authorizer:
        from flexfed.server.auth import Authorizer

        return Authorizer(self.pki.ca_pem, self.pki.crl_pem)

    def channel(self, address: str, member: Member) -> grpc.Channel:
        return secure_channel(address, self.pki.ca_pem, member.cert, member.key)

    def coordinator_init_args(self, directory: Path, anchor: Path, origin: str) -> list[str]:
        """``flexfed coordinator init`` for this consortium on 127.0.0.1 (any free port)."""
        return [
            "coordinator", "init", str(directory),
            "--ca-cert", str(self.pki.ca_pem),
            "--crl", str(self.pki.crl_pem),
            "--tls-cert", str(self.server.cert),
            "--tls-key", str(self.server.key),
            "--anchor", str(anchor),
            "--listen", "127.0.0.1:0",
            "--origin", origin,
        ]  # fmt: skip


FLEXFED = Path(sys.executable).parent / "flexfed"


@contextmanager
def served_coordinator(
    consortium: Consortium,
    anchor: Path,
    work: Path,
    origin: str,
    limits: Mapping[str, float | int] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[Path, str]]:
    """``flexfed coordinator init`` then ``serve`` as a real subprocess; yields the coordinator
    directory and the address it serves on. ``limits`` overrides keys of ``[limits]`` in the
    generated coordinator.toml (each must be there already); ``env`` adds to the server's
    environment (e.g. failpoints). Stops it with SIGTERM and checks
    it exits 0; its stderr is ``work/serve.log``."""
    from click.testing import CliRunner

    from flexfed.common.cli import cli

    root = work / "coordinator"
    result = CliRunner().invoke(cli, consortium.coordinator_init_args(root, anchor, origin))
    assert result.exit_code == 0, result.output
    toml = root / "coordinator.toml"
    text = toml.read_text()
    for key, value in (limits or {}).items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        assert n == 1, f"{key} is not in coordinator.toml"
    toml.write_text(text)
    log = work / "serve.log"
    stderr = open(log, "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [str(FLEXFED), "coordinator", "serve", str(root)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 60)
        line = process.stdout.readline() if ready else ""
        address = line.split("serving on ")[-1].split()[0] if "serving on" in line else ""
        assert address, f"no start line: {line!r}\n{log.read_text()}"
        yield root, address
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()
