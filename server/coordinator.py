"""The coordinator's state in one place: its directory, store, registry, log and anchor.

:func:`init_coordinator` makes a coordinator directory (see :mod:`flexfed.server.config` for
the layout): it checks the TLS identity against the CA, creates the transparency log and a
fresh P-256 log key, the store and the registry, and publishes the anchor (packed into the
store, extracted back as the copy every submission is validated against).

:class:`Coordinator` opens one for serving. The services share it; its :attr:`~Coordinator.
lock` is held around every log append together with the registry write that follows it, so
the log order and the registry never disagree between two calls.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import ConfigError, MissingFileError
from flexfed.common.formats.anchor import Anchor, open_anchor
from flexfed.common.formats.archive import ArtifactKind, extract_archive
from flexfed.common.translog.checkpoint import SignedCheckpoint
from flexfed.common.translog.filelog import FileLog
from flexfed.common.trust.keys import private_pem
from flexfed.common.trust.log_events import open_log
from flexfed.common.trust.pki import CertificateError, load_certificate, load_crl, verify_chain
from flexfed.common.trust.signing import load_private_key
from flexfed.common.util.clock import utc_now
from flexfed.common.util.fs import atomic_write_text, write_private
from flexfed.server.config import (
    CONFIG_FILE,
    DEFAULT_DATABASE,
    DEFAULT_LISTEN,
    AnchorRef,
    CoordinatorConfig,
    Limits,
    TlsFiles,
    load_config,
)
from flexfed.server.failpoints import failpoint
from flexfed.server.registry import AnchorRecord, Registry, display_url
from flexfed.server.store import ArtifactStore

logger = logging.getLogger(__name__)
T = TypeVar("T")


class CoordinatorExistsError(ConfigError, FileExistsError):
    """``init`` was pointed at a directory that is already in use."""


def _check_tls(tls: TlsFiles) -> None:
    """Refuse a TLS identity the members would refuse: not the CA's, revoked, wrong key."""
    for what, path in (("CA certificate", tls.ca_cert), ("TLS certificate", tls.cert)):
        if not path.is_file():
            raise MissingFileError(f"{what} {path} does not exist")
    if tls.crl is not None and not tls.crl.is_file():
        raise MissingFileError(f"CRL {tls.crl} does not exist")
    ca = load_certificate(tls.ca_cert)
    cert = load_certificate(tls.cert)
    crl = load_crl(tls.crl) if tls.crl else None
    try:
        verify_chain(cert, ca, utc_now(), crl, roles=("operator",))
    except CertificateError as err:
        raise ConfigError(
            f"{tls.cert} cannot be the coordinator's identity: {err} (issue an operator "
            "certificate with --san-ip/--san-dns for the coordinator's address)"
        ) from err
    if load_private_key(tls.key).public_key() != cert.public_key():
        raise ConfigError(f"{tls.key} is not the private key of {tls.cert}")


def init_coordinator(
    root: Path | str,
    *,
    ca_cert: Path,
    tls_cert: Path,
    tls_key: Path,
    anchor_dir: Path,
    crl: Path | None = None,
    listen: str = DEFAULT_LISTEN,
    database: str = DEFAULT_DATABASE,
    origin: str | None = None,
    limits: Limits | None = None,
) -> CoordinatorConfig:
    """Create a coordinator directory at ``root``; refuse one that exists and is not empty."""
    root = Path(root).resolve()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CoordinatorExistsError(
            f"{root} already exists and is not empty; a coordinator directory is never "
            "overwritten (choose a new path)"
        )
    tls = TlsFiles(
        ca_cert=Path(ca_cert).resolve(),
        cert=Path(tls_cert).resolve(),
        key=Path(tls_key).resolve(),
        crl=Path(crl).resolve() if crl else None,
    )
    _check_tls(tls)
    source = open_anchor(anchor_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _populate(root, tls, source, listen, database, origin, limits or Limits())
    except BaseException:
        # NOTE: without coordinator.toml nothing here is a coordinator; leave no half of one.
        if created:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for child in root.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise


def _populate(
    root: Path,
    tls: TlsFiles,
    source: Anchor,
    listen: str,
    database: str,
    origin: str | None,
    limits: Limits,
) -> CoordinatorConfig:
    provisional = CoordinatorConfig(
        root=root,
        listen=listen,
        database=database,
        tls=tls,
        anchor=AnchorRef(source.digest, "", source.family.dense_model_type),
        log_origin=origin or f"flexfed/{os.urandom(6).hex()}",
        limits=limits,
    )
    for folder in (provisional.log_dir, provisional.store_dir, provisional.staging_dir):
        folder.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(provisional.log_key, private_pem(key))
    provisional.log_public_key.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    open_log(provisional.log_file).close()
    store = ArtifactStore(
        provisional.store_dir,
        max_artifact_bytes=limits.max_artifact_bytes,
        max_chunk_bytes=limits.max_chunk_bytes,
    )
    info = store.put_directory(source.path, ArtifactKind.ANCHOR)
    # NOTE: the copy the coordinator validates against is the published bytes themselves.
    extract_archive(store.path(info.digest), provisional.anchor_dir)
    published = open_anchor(provisional.anchor_dir)
    if published.digest != source.digest:
        raise ConfigError(
            f"the anchor changed while it was published ({source.path}); publish it again"
        )
    family = published.family.dense_model_type
    config = replace(provisional, anchor=AnchorRef(source.digest, info.digest, family))
    registry = Registry(config.database_url)
    try:
        existing = registry.anchor()
        if existing is not None and existing.digest != source.digest:
            raise ConfigError(
                f"the database {display_url(database)} already belongs to a coordinator with "
                f"anchor {existing.digest[:16]}...; give a new database"
            )
        registry.set_anchor(AnchorRecord(source.digest, info.digest, config.anchor.family))
    finally:
        registry.close()
    # 0600: the database URL in it may carry a password.
    atomic_write_text(config.config_file, config.to_toml(), mode=0o600)
    logger.info("coordinator initialised in %s (anchor %s)", root, info.digest)
    return config


@dataclass(frozen=True)
class LogSnapshot:
    """A signed checkpoint and an entry's inclusion proof in it."""

    checkpoint: SignedCheckpoint
    tree_size: int
    proof: list[bytes]


class Coordinator:
    """An opened coordinator directory: what every service works on."""

    def __init__(self, config: CoordinatorConfig, *, log: FileLog | None = None) -> None:
        """Open ``config``'s coordinator; ``log`` replaces its log (e.g. a copy, to check)."""
        self.config = config
        for what, path in (
            ("CA certificate", config.tls.ca_cert),
            ("TLS certificate", config.tls.cert),
            ("TLS key", config.tls.key),
            ("log key", config.log_key),
        ):
            if not path.is_file():
                raise MissingFileError(f"{what} {path} does not exist (see {CONFIG_FILE})")
        self.lock = threading.RLock()
        self.ca_cert: x509.Certificate = load_certificate(config.tls.ca_cert)
        self.log_key = load_private_key(config.log_key)
        self.log_public_pem = config.log_public_key.read_bytes()
        self.anchor = open_anchor(config.anchor_dir)
        self.store = ArtifactStore(
            config.store_dir,
            max_artifact_bytes=config.limits.max_artifact_bytes,
            max_chunk_bytes=config.limits.max_chunk_bytes,
        )
        self.registry = Registry(config.database_url)
        self.log = log or open_log(config.log_file)
        config.staging_dir.mkdir(exist_ok=True)
        # A registry write failed after its log entry (e.g. the database went away, twice):
        # the services run the startup recovery before the next change (consistency.recover).
        self.needs_recovery = False

    def after_log(self, write: Callable[[], T], what: str) -> T:
        """Run ``write``, the registry change that a log entry already written stands for.

        FIX (issue 12): an opt-out whose registry write failed after its log entry answered
        UNKNOWN, and registry and log disagreed until a restart. The log entry is the
        decision, so the change is completed: retried once at once, and if that fails too,
        :attr:`needs_recovery` makes the next change replay the log first.
        """
        try:
            failpoint("registry-after-log")  # fault tests: the first registry write fails
            return write()
        except Exception:
            logger.exception("%s: the registry write after its log entry failed; retrying", what)
            try:
                return write()
            except Exception:
                self.needs_recovery = True
                raise

    @classmethod
    def open(cls, root: Path | str) -> Coordinator:
        return cls(load_config(root))

    def close(self) -> None:
        self.log.close()
        self.registry.close()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_anchor(self) -> None:
        """Refuse to serve if the anchor copy is not the published one (hashes every file)."""
        if self.anchor.digest != self.config.anchor.digest:
            raise ConfigError(
                f"{self.config.anchor_dir} has digest {self.anchor.digest[:16]}..., not the "
                f"published {self.config.anchor.digest[:16]}...: restore it from the store "
                f"artifact {self.config.anchor.artifact_digest}"
            )

    def current_crl(self) -> x509.CertificateRevocationList | None:
        """The CRL as the file is now (re-read every time: a new CRL applies at once)."""
        return load_crl(self.config.tls.crl) if self.config.tls.crl else None

    # --- the log (callers hold self.lock when they also write the registry)
    def append(self, event: Mapping[str, Any]) -> int:
        with self.lock:
            return self.log.append(event)

    def checkpoint(self) -> SignedCheckpoint:
        with self.lock:
            return self.log.checkpoint(self.config.log_origin, self.log_key)

    def proof_of(self, index: int) -> LogSnapshot:
        """A fresh signed checkpoint and the inclusion proof of entry ``index`` in it."""
        with self.lock:
            signed = self.checkpoint()
            size = self.log.size
            return LogSnapshot(signed, size, self.log.inclusion_proof(index, size))

    def staging(self, name: str) -> Path:
        """A fresh scratch directory under DIR/staging (the caller removes it)."""
        path = self.config.staging_dir / f"{name}-{os.urandom(8).hex()}"
        path.mkdir()
        return path

    def clear_staging(self) -> list[Path]:
        """Remove what interrupted work left in DIR/staging (at startup, after recovery)."""
        removed = list(self.config.staging_dir.iterdir())
        for path in removed:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
        return removed
