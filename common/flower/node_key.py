"""Flower node-authentication keys: what a SuperNode signs in with (not a consortium key).

The data owner makes one with ``python -m flexfed.client.flower_node keygen PATH`` (or
``deploy/flower/node-key.sh``) and sends the operator the public half, which the operator
registers with the SuperLink; the demos make them for their simulated owners.
"""

from __future__ import annotations

from pathlib import Path

from flexfed.common.trust.keys import KeyExistsError
from flexfed.common.util.fs import write_private


def generate_node_key(path: Path) -> tuple[Path, Path]:
    """Write a Flower node-authentication key: ``path`` (private, OpenSSH, 0600) and ``.pub``.

    ECDSA P-384, the curve Flower's documentation uses; any NIST curve is accepted by 1.42.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = path.with_name(path.name + ".pub")
    for existing in (path, public):
        if existing.exists():
            raise KeyExistsError(f"{existing} exists; not overwriting a node key")
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, private_bytes)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return path, public
