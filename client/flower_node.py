"""A data owner's SuperNode: its node config and its Flower node-authentication key.

The owner starts ``flower-supernode`` next to its data (see ``deploy/flower/supernode.sh``)
with ``--node-config``; everything private stays in that config on the owner's machine:

========================  =====================================================================
``data-path``             the training data (file or folder, as ``flexfed client train --data``)
``cert`` / ``key``        the owner's consortium certificate and private key (Consortium API
                          mTLS and expert signing)
``ca``                    the consortium CA certificate
``work-dir``              where anchors, experts and released models are kept
                          (default ``~/.flexfed/flower``)
``coordinator``           optional: pin the Consortium API address; a plan naming another
                          address is refused (credentials only go where the owner says)
``device``                optional: ``auto`` (default), ``cpu``, ``cuda``
========================  =====================================================================

The node key (``--auth-supernode-private-key``) is a separate ECDSA key in OpenSSH format, as
Flower 1.42 requires; its public half is what the operator registers with
``flwr supernode register``. It is not the consortium signing key: a stolen node key lets a
machine take part in campaigns, never sign as the owner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexfed.common.errors import ConfigError
from flexfed.common.flower.node_key import generate_node_key

NODE_CONFIG_KEYS = ("data-path", "cert", "key", "ca", "work-dir", "coordinator", "device")


@dataclass(frozen=True)
class NodeSettings:
    """The owner-side settings of one SuperNode, from its ``--node-config``."""

    data_path: Path
    cert: Path
    key: Path
    ca: Path
    work_dir: Path
    coordinator: str = ""
    device: str = "auto"

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Parse and check the node config; every problem is one :class:`ConfigError` line."""
        unknown = sorted(set(node_config) - set(NODE_CONFIG_KEYS))
        if unknown:
            raise ConfigError(f"unknown node-config key(s): {', '.join(unknown)}")
        missing = [k for k in ("data-path", "cert", "key", "ca") if not node_config.get(k)]
        if missing:
            raise ConfigError(
                f"the SuperNode's --node-config lacks {', '.join(missing)} "
                "(see deploy/flower/supernode.sh)"
            )
        paths = {
            k: Path(str(node_config[k])).expanduser() for k in ("data-path", "cert", "key", "ca")
        }
        for name, path in paths.items():
            if not path.exists():
                raise ConfigError(f"node-config {name} {path} does not exist on this node")
        work = node_config.get("work-dir") or Path.home() / ".flexfed" / "flower"
        return cls(
            data_path=paths["data-path"],
            cert=paths["cert"],
            key=paths["key"],
            ca=paths["ca"],
            work_dir=Path(str(work)).expanduser(),
            coordinator=str(node_config.get("coordinator", "")),
            device=str(node_config.get("device", "auto")),
        )

    def coordinator_for(self, planned: str) -> str:
        """The Consortium API address to use for a plan that names ``planned``."""
        if self.coordinator and planned and planned != self.coordinator:
            raise ConfigError(
                f"the plan names Consortium API {planned}, but this node is pinned to "
                f"{self.coordinator} (node-config coordinator); refusing to send credentials there"
            )
        address = self.coordinator or planned
        if not address:
            raise ConfigError("no Consortium API address: neither the plan nor node-config has one")
        return address


def main(argv: list[str] | None = None) -> int:
    """``python -m flexfed.client.flower_node keygen PATH``: make a node key (scripts use it)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "keygen":
        print("usage: python -m flexfed.client.flower_node keygen PATH", file=sys.stderr)
        return 2
    try:
        private, public = generate_node_key(Path(args[1]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"wrote node key {private} (keep it here) and {public} (send it to the operator)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
