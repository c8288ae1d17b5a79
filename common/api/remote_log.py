"""The coordinator's transparency log, read over the Consortium API and trusted only as proven.

An auditor does not trust the server: :func:`fetch_log` downloads the signed checkpoint and
verifies it with the log's public key (pinned by the auditor, never taken from the server
unless asked), downloads every entry up to that size, rebuilds the Merkle tree locally and
requires its root to equal the signed one. The result is a :class:`VerifiedLog`: the same
reader interface as a local :class:`~flexfed.common.translog.log.FileLog` (``size``, ``entry``,
``root``, ``inclusion_proof``, ``consistency_proof``), with every answer computed from
verified data, so :func:`flexfed.common.trust.audit.audit_model` audits against it unchanged.

Addresses are ``grpcs://HOST:PORT`` (mutual TLS with the consortium CA).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.api.tls import secure_channel
from flexfed.common.errors import ConfigError, TransferError
from flexfed.common.translog.checkpoint import Checkpoint, SignedCheckpoint, verify_checkpoint
from flexfed.common.translog.filelog import LogIntegrityError
from flexfed.common.translog.merkle import MerkleTree
from flexfed.proto.v1 import audit_pb2, audit_pb2_grpc

log = logging.getLogger(__name__)

SCHEME = "grpcs://"
PAGE = 1000  # entries asked for per call (the server may return fewer)


def is_remote(location: str | Path) -> bool:
    return str(location).startswith(SCHEME)


def parse_address(url: str) -> str:
    """``grpcs://host:port`` -> ``host:port``."""
    if not is_remote(url):
        raise ConfigError(f"{url}: a coordinator log address looks like {SCHEME}HOST:PORT")
    address = url[len(SCHEME) :].rstrip("/")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{url}: a coordinator log address looks like {SCHEME}HOST:PORT")
    return address


@dataclass
class VerifiedLog:
    """A log whose entries were checked against a signed checkpoint (read-only)."""

    checkpoint: Checkpoint
    tree: MerkleTree
    entries_: list[bytes]

    @property
    def size(self) -> int:
        return self.tree.size

    def entry(self, index: int) -> bytes:
        return self.entries_[index]

    def root(self, tree_size: int | None = None) -> bytes:
        return self.tree.root(tree_size)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        return self.tree.inclusion_proof(index, tree_size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        return self.tree.consistency_proof(old_size, new_size)


def _failed(what: str, err: grpc.RpcError) -> TransferError:
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    return TransferError(f"the coordinator log: {what} failed ({code}): {details}")


def fetch_log(
    channel: grpc.Channel,
    key: ec.EllipticCurvePublicKey,
    *,
    origin: str | None = None,
    timeout: float = 60.0,
) -> VerifiedLog:
    """Download and verify the whole log behind ``channel`` (see the module docstring)."""
    stub = audit_pb2_grpc.AuditServiceStub(channel)
    try:
        signed = stub.GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=timeout)
    except grpc.RpcError as err:
        raise _failed("GetCheckpoint", err) from err
    checkpoint = verify_checkpoint(SignedCheckpoint.from_text(signed.text), key, origin=origin)
    entries: list[bytes] = []
    while len(entries) < checkpoint.tree_size:
        start = len(entries)
        request = audit_pb2.GetEntriesRequest(
            start=start, end=min(checkpoint.tree_size, start + PAGE)
        )
        try:
            page = stub.GetEntries(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _failed("GetEntries", err) from err
        if page.start != start or not page.entries:
            raise LogIntegrityError(
                f"the coordinator answered entries from {page.start} ({len(page.entries)} of "
                f"them) when asked from {start}"
            )
        entries.extend(page.entries[: checkpoint.tree_size - start])
    tree = MerkleTree.from_entries(entries)
    if tree.root() != checkpoint.root_hash:
        raise LogIntegrityError(
            f"the {len(entries)} entries the coordinator served do not hash to the root its "
            "signed checkpoint commits to"
        )
    log.info("verified %d log entries of %s", len(entries), checkpoint.origin)
    return VerifiedLog(checkpoint, tree, entries)


def open_remote_log(
    url: str,
    key: ec.EllipticCurvePublicKey,
    ca: Path | str,
    cert: Path | str,
    private_key: Path | str,
    *,
    origin: str | None = None,
) -> VerifiedLog:
    """:func:`fetch_log` from ``grpcs://host:port`` as the member holding ``cert``/``key``."""
    with secure_channel(parse_address(url), ca, cert, private_key) as channel:
        return fetch_log(channel, key, origin=origin)
