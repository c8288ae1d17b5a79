"""Test support: a consortium CA in a temporary directory, and the members it certified.

Importable from every test (tests/ is on sys.path): ``from consortium import Pki``.
"""

from __future__ import annotations

import datetime as dt
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
