"""``flexfed client keygen``: a data owner's signing key and certificate request.

The key is made here and never leaves this machine (mode 0600, never printed); only the
request (csr.pem) goes to the consortium operator, who returns a certificate.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command("keygen")
@click.option("--org", required=True, help="Your organisation's name (as in expert.json).")
@click.option(
    "--out",
    default="keys",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Directory for key.pem (private) and csr.pem (to send).",
)
@click.option(
    "--role",
    default="owner",
    show_default=True,
    type=click.Choice(["owner", "operator", "auditor"]),
    help="The role you ask for; the operator's CA decides.",
)
def keygen(org: str, out: Path, role: str) -> None:
    """Make an ECDSA P-256 key and a certificate request (CSR) for your organisation."""
    from flexfed.common.trust.keys import generate_key_and_csr

    req = generate_key_and_csr(org, out, role_hint=role)
    click.echo(
        f"wrote private key {req.key} (mode 0600: keep it here, never share it) and certificate "
        f"request {req.csr}; send {req.csr.name} to the consortium operator and put the "
        f"certificate you get back next to the key"
    )
