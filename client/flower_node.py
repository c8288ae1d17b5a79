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
``anchors``               optional: the anchor digests this owner approved, comma-separated
                          (``flexfed anchor verify`` prints one); a campaign for any other
                          anchor is refused, whatever the coordinator publishes
``max-steps``             optional: the most training steps a campaign may ask for
``max-seq-len``           optional: the longest sequence length a campaign may ask for
``max-tokens``            optional: the most tokens (steps x batch x sequence length) a
                          campaign may train on
========================  =====================================================================

The last four are the owner's consent, kept on the node: the plan comes from the operator,
and so does the anchor announcement, so only the node can hold the owner to what it agreed
to. A refusal reaches the ServerApp as a one-line reason, never as data.

The node key (``--auth-supernode-private-key``) is a separate ECDSA key in OpenSSH format, as
Flower 1.42 requires; its public half is what the operator registers with
``flwr supernode register``. It is not the consortium signing key: a stolen node key lets a
machine take part in campaigns, never sign as the owner.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexfed.common.errors import ConfigError
from flexfed.common.flower.node_key import generate_node_key

NODE_CONFIG_KEYS = (
    "data-path",
    "cert",
    "key",
    "ca",
    "work-dir",
    "coordinator",
    "device",
    "anchors",
    "max-steps",
    "max-seq-len",
    "max-tokens",
)
_DIGEST = re.compile(r"[0-9a-f]{64}")


class ConsentError(ConfigError):
    """A campaign asks for what this node's owner did not agree to."""


def _bound(node_config: Mapping[str, Any], key: str) -> int | None:
    value = node_config.get(key)
    if value in (None, ""):
        return None
    try:
        bound = int(str(value))
    except ValueError:
        bound = 0
    if bound < 1:
        raise ConfigError(f"node-config {key} must be a positive integer, got {value!r}")
    return bound


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
    anchors: tuple[str, ...] = ()  # approved anchor digests; empty: any (not recommended)
    max_steps: int | None = None
    max_seq_len: int | None = None
    max_tokens: int | None = None

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
        anchors = tuple(
            a.strip().removeprefix("sha256:")
            for a in str(node_config.get("anchors", "")).replace(" ", ",").split(",")
            if a.strip()
        )
        bad = [a for a in anchors if not _DIGEST.fullmatch(a)]
        if bad:
            raise ConfigError(
                f"node-config anchors: {bad[0]!r} is not an anchor digest (64 lowercase hex)"
            )
        return cls(
            data_path=paths["data-path"],
            cert=paths["cert"],
            key=paths["key"],
            ca=paths["ca"],
            work_dir=Path(str(work)).expanduser(),
            coordinator=str(node_config.get("coordinator", "")),
            device=str(node_config.get("device", "auto")),
            anchors=anchors,
            max_steps=_bound(node_config, "max-steps"),
            max_seq_len=_bound(node_config, "max-seq-len"),
            max_tokens=_bound(node_config, "max-tokens"),
        )

    def approve_anchor(self, digest: str) -> None:
        """Refuse an anchor the owner did not approve (when it approved any)."""
        if self.anchors and digest.removeprefix("sha256:") not in self.anchors:
            raise ConsentError(
                f"anchor {digest[:16]}... is not one this node's owner approved (node-config "
                f"anchors: {', '.join(a[:16] + '...' for a in self.anchors)}); refusing to train "
                "or evaluate on it"
            )

    def check_plan(self, steps: int, seq_len: int, batch_size: int) -> None:
        """Refuse a training plan beyond the owner's bounds."""
        asks = [
            ("max-steps", steps, self.max_steps),
            ("max-seq-len", seq_len, self.max_seq_len),
            ("max-tokens", steps * batch_size * seq_len, self.max_tokens),
        ]
        for key, asked, bound in asks:
            if bound is not None and asked > bound:
                raise ConsentError(
                    f"the plan asks for {asked} ({key.removeprefix('max-')}), more than this "
                    f"node's owner allows (node-config {key} = {bound})"
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
