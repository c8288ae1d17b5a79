"""``flexfed client sign``: sign an expert bundle with the owner's key and certificate.

Writes ``provenance.intoto.json`` (who built these weights, from which anchor, data commitment
and code) and then ``model.sig`` (an OpenSSF model-signing bundle over expert.json and
expert.safetensors). Refuses a certificate for another org than expert.json names and a key
that is not the certificate's. :func:`sign_bundle` is the same for code (``client train
--sign``, the Flower ClientApp).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # imported when used: `flexfed client --help` stays fast
    from flexfed.common.trust.pki import PathLike
    from flexfed.common.trust.signing import SignedBundle


def sign_bundle(
    bundle_dir: PathLike,
    key: PathLike,
    cert: PathLike,
    chain: Iterable[PathLike] = (),
    *,
    check: bool = True,
) -> SignedBundle:
    """Sign an expert bundle: provenance, then ``model.sig``; return what was written.

    ``chain``: PEM files shipped after the certificate in ``model.sig`` (usually the CA's
    ``ca.pem``). With ``check`` and the issuing CA among them, the fresh signature is verified
    against that CA before returning, so a bundle that the coordinator would refuse for its
    signature never leaves the machine.
    """
    from flexfed.common.trust.signing import BundleSigner, BundleVerifier

    signer = BundleSigner(key, cert, chain)
    signed = signer.sign(bundle_dir)
    if check and signer.issuer is not None:
        BundleVerifier(signer.issuer).verify(signed.path)
    return signed


@click.command("sign")
@click.argument("expert_dir", type=click.Path(path_type=Path))
@click.option(
    "--key",
    required=True,
    type=click.Path(path_type=Path),
    help="Your private key (key.pem from `flexfed client keygen`).",
)
@click.option(
    "--cert",
    required=True,
    type=click.Path(path_type=Path),
    help="Your owner certificate from the consortium operator.",
)
@click.option(
    "--chain",
    "chain",
    multiple=True,
    type=click.Path(path_type=Path),
    help="CA certificate(s) to include, usually ca.pem (repeat); also checks the result.",
)
def sign(expert_dir: Path, key: Path, cert: Path, chain: tuple[Path, ...]) -> None:
    """Sign EXPERT_DIR: write provenance.intoto.json and model.sig."""
    signed = sign_bundle(expert_dir, key, cert, chain)
    click.echo(
        f"signed {signed.path} as {signed.identity}: wrote {signed.provenance.name} and "
        f"{signed.signature.name} (weights sha256 {signed.weights_sha256[:16]}...)"
    )
