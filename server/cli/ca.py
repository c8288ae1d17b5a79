"""``flexfed ca ...``: the operator runs the consortium CA (init, issue, revoke, crl, show).

Private keys are written with mode 0600 and never printed; every command prints only paths,
serial numbers, names and fingerprints.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from flexfed.common.trust.ca import (
    CA_CERT,
    CA_CRL,
    REVOCATION_REASONS,
    init_ca,
    issue_certificate,
    issued_certificates,
    revoke,
    write_crl,
)
from flexfed.common.trust.pki import (
    ROLES,
    fingerprint,
    format_serial,
    identity_of,
    load_certificate,
    load_crl,
    verify_chain,
)
from flexfed.common.util.clock import utc_now

CA_DIR_OPTION = click.option(
    "--ca",
    "ca_dir",
    default="ca",
    show_default=True,
    envvar="FLEXFED_CA_DIR",
    type=click.Path(path_type=Path),
    help="The CA directory (or set FLEXFED_CA_DIR).",
)


@click.group("ca")
def group() -> None:
    """Operator: the consortium CA that certifies owners, the operator and auditors."""


@group.command("init")
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="The CA directory to create."
)
@click.option("--name", default="Consortium CA", show_default=True, help="The CA's common name.")
@click.option("--days", default=3650, show_default=True, type=int, help="CA validity in days.")
@click.option("--crl-days", default=30, show_default=True, type=int, help="CRL validity in days.")
def init(out: Path, name: str, days: int, crl_days: int) -> None:
    """Create a CA: ca.pem (publish it), ca.key (0600, keep it offline), crl.pem, ca.json."""
    paths = init_ca(out, name, days, crl_days=crl_days)
    cert = load_certificate(paths.cert)
    click.echo(
        f"created CA {name!r} in {out}: certificate {paths.cert} "
        f"(SHA-256 {fingerprint(cert)}), key {paths.key} (mode 0600)"
    )


@group.command("issue")
@click.argument("csr", type=click.Path(path_type=Path))
@click.option("--role", required=True, type=click.Choice(ROLES), help="What the holder may do.")
@click.option("--days", default=365, show_default=True, type=int, help="Validity in days.")
@click.option(
    "--out",
    default=None,
    type=click.Path(path_type=Path),
    help="Where to write the certificate (default: next to the CSR, csr.pem -> cert.pem).",
)
@CA_DIR_OPTION
@click.option(
    "--san-dns", multiple=True, help="Operator: a DNS name the coordinator serves (repeat)."
)
@click.option("--san-ip", multiple=True, help="Operator: an IP the coordinator serves (repeat).")
def issue(
    csr: Path,
    role: str,
    days: int,
    out: Path | None,
    ca_dir: Path,
    san_dns: tuple[str, ...],
    san_ip: tuple[str, ...],
) -> None:
    """Verify a certificate request (CSR) and issue a certificate for ROLE."""
    issued = issue_certificate(ca_dir, csr, role, days, out, san_dns=san_dns, san_ip=san_ip)
    ident = issued.identity
    click.echo(
        f"issued {ident.role} certificate for {ident.org!r}: serial {ident.serial_hex}, valid "
        f"until {ident.not_after:%Y-%m-%d}, written to {issued.path}"
    )


@group.command("revoke")
@click.argument("cert_or_serial")
@click.option(
    "--reason",
    default="unspecified",
    show_default=True,
    type=click.Choice(list(REVOCATION_REASONS)),
    help="Why. superseded, cessation-of-operation and affiliation-changed keep earlier "
    "signatures valid; any other reason voids them too.",
)
@CA_DIR_OPTION
@click.option("--crl-days", default=30, show_default=True, type=int, help="CRL validity in days.")
def revoke_command(cert_or_serial: str, reason: str, ca_dir: Path, crl_days: int) -> None:
    """Revoke a certificate (a file, or its hex serial) and update the CA's crl.pem."""
    rec = revoke(ca_dir, cert_or_serial, reason, crl_days=crl_days)
    assert rec.revoked_at is not None
    click.echo(
        f"serial {format_serial(rec.serial)} ({rec.org}, {rec.role}) revoked as of "
        f"{rec.revoked_at:%Y-%m-%d %H:%M:%S} UTC ({rec.reason}); CRL: {ca_dir / CA_CRL} "
        "(publish it)"
    )


@group.command("crl")
@CA_DIR_OPTION
@click.option(
    "--out",
    default=None,
    type=click.Path(path_type=Path),
    help="Also write the CRL here (it is always written to the CA's crl.pem).",
)
@click.option("--days", default=30, show_default=True, type=int, help="CRL validity in days.")
def crl_command(ca_dir: Path, out: Path | None, days: int) -> None:
    """Sign a fresh CRL. Run it before the last one expires: verifiers reject stale CRLs."""
    path = write_crl(ca_dir, out, days=days)
    until = utc_now() + dt.timedelta(days=days)
    click.echo(f"wrote CRL {path}, valid until {until:%Y-%m-%d}")


@group.command("show")
@click.argument("cert", required=False, type=click.Path(path_type=Path))
@CA_DIR_OPTION
def show(cert: Path | None, ca_dir: Path) -> None:
    """Show the CA and what it issued, or check CERT against the CA and its CRL now."""
    ca_cert = load_certificate(ca_dir / CA_CERT)
    now = utc_now()
    if cert is not None:
        leaf = load_certificate(cert)
        ident = identity_of(leaf)
        click.echo(
            f"{cert}: {ident.org} ({ident.role}), serial {ident.serial_hex}, valid "
            f"{ident.not_before:%Y-%m-%d} .. {ident.not_after:%Y-%m-%d}, SHA-256 "
            f"{ident.fingerprint}"
        )
        crl_path = ca_dir / CA_CRL
        verify_chain(leaf, ca_cert, now, load_crl(crl_path) if crl_path.is_file() else None)
        click.echo(f"OK: issued by {ca_cert.subject.rfc4514_string()}, valid now, not revoked")
        return
    click.echo(
        f"CA {ca_cert.subject.rfc4514_string()}: valid {ca_cert.not_valid_before_utc:%Y-%m-%d}"
        f" .. {ca_cert.not_valid_after_utc:%Y-%m-%d}, SHA-256 "
        f"{fingerprint(ca_cert)}"
    )
    records = issued_certificates(ca_dir)
    if not records:
        click.echo("no certificates issued yet")
    for rec in records:
        if rec.revoked_at is not None:
            status = f"revoked {rec.revoked_at:%Y-%m-%d} ({rec.reason})"
        elif rec.not_after < now:
            status = "expired"
        else:
            status = "valid"
        click.echo(
            f"{format_serial(rec.serial):>40}  {rec.role:<8}  {rec.org:<24}  "
            f"until {rec.not_after:%Y-%m-%d}  {status}"
        )
