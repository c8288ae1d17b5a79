"""The coordinator's configuration: ``coordinator.toml`` in the coordinator directory.

A coordinator directory has a fixed layout (written by ``flexfed coordinator init``)::

    DIR/coordinator.toml   this configuration
    DIR/registry.db        the registry (SQLite by default; ``database`` may name any URL)
    DIR/log/tlog           the transparency log (flexfed.common.translog.log.FileLog)
    DIR/log/log-key.pem    the log's P-256 signing key (mode 0600)
    DIR/log/log-key.pub.pem   its public key, for auditors
    DIR/store/             the content-addressed artifact store
    DIR/anchor/            the published anchor, extracted from its artifact in the store
    DIR/staging/           scratch space for submissions and releases (emptied at start)

Only what differs between deployments is configurable: the listen address, limits, the
database URL, the TLS files (referenced where the operator keeps them, so a new CRL takes
effect without editing anything), the release signer, and the log's origin. Relative paths
in the file are taken relative to the directory, so a coordinator directory can be moved.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexfed.common.errors import ConfigError, MissingFileError
from flexfed.common.translog.checkpoint import Checkpoint, CheckpointFormatError

CONFIG_FILE = "coordinator.toml"
CONFIG_FORMAT = "flexfed.coordinator/v1"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATABASE = "sqlite:///registry.db"
DEFAULT_MAX_ARTIFACT_BYTES = 64 << 30
DEFAULT_MAX_CHUNK_BYTES = 1 << 20
DEFAULT_WORKERS = 16
DEFAULT_RESERVED_WORKERS = 4
DEFAULT_STREAMS_PER_MEMBER = 2
DEFAULT_MAX_CONCURRENT_RPCS = 64
DEFAULT_UPLOADS_PER_MEMBER = 4
DEFAULT_UNSUBMITTED_DAYS = 7.0
DEFAULT_GRACE_SECONDS = 10.0
DEFAULT_STREAM_IDLE_SECONDS = 120.0


@dataclass(frozen=True)
class Limits:
    """What one client may cost the coordinator."""

    max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
    workers: int = DEFAULT_WORKERS  # threads serving calls
    grace_seconds: float = DEFAULT_GRACE_SECONDS  # how long in-flight calls get at shutdown
    # FIX (tests/integration/test_load.py): an Upload/Download stream without progress for
    # this long is cancelled, freeing its worker; `workers` stalled streams froze the server.
    stream_idle_seconds: float = DEFAULT_STREAM_IDLE_SECONDS
    # FIX (issue 12; tests/integration/test_admission.py): the idle watchdog alone let one
    # member hold every worker with `workers` idle streams for idle_seconds at a time, and
    # the health check starved with the rest. Transfer streams are bounded per member and in
    # all, leaving `reserved_workers` threads to the short calls (flexfed.server.admission).
    streams_per_member: int = DEFAULT_STREAMS_PER_MEMBER
    reserved_workers: int = DEFAULT_RESERVED_WORKERS
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS  # beyond it: refused, not queued
    # unfinished uploads one organisation may hold (each bounded by the anchor's bundle size)
    uploads_per_member: int = DEFAULT_UPLOADS_PER_MEMBER
    # an uploaded bundle never submitted for this long is deleted when the coordinator starts
    unsubmitted_days: float = DEFAULT_UNSUBMITTED_DAYS

    @property
    def transfer_streams(self) -> int:
        """Upload and Download streams open at once, all members together."""
        return self.workers - self.reserved_workers

    def __post_init__(self) -> None:
        for name in (
            "max_artifact_bytes",
            "max_chunk_bytes",
            "workers",
            "streams_per_member",
            "reserved_workers",
            "max_concurrent_rpcs",
            "uploads_per_member",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limits.{name} must be a positive integer, got {value!r}")
        # NOTE: a chunk travels in one gRPC message; flexfed.common.api.tls caps messages at 8 MiB.
        if self.max_chunk_bytes > 4 << 20:
            raise ConfigError("limits.max_chunk_bytes must be at most 4 MiB (4194304)")
        if self.reserved_workers >= self.workers:
            raise ConfigError(
                f"limits.reserved_workers ({self.reserved_workers}) must be below limits.workers "
                f"({self.workers}): the rest serve transfer streams"
            )
        if self.max_concurrent_rpcs < self.workers:
            raise ConfigError(
                f"limits.max_concurrent_rpcs ({self.max_concurrent_rpcs}) must be at least "
                f"limits.workers ({self.workers})"
            )
        if not isinstance(self.grace_seconds, int | float) or self.grace_seconds < 0:
            raise ConfigError("limits.grace_seconds must be a number of seconds, 0 or more")
        days = self.unsubmitted_days
        if isinstance(days, bool) or not isinstance(days, int | float) or days <= 0:
            raise ConfigError("limits.unsubmitted_days must be a number of days, above 0")
        idle = self.stream_idle_seconds
        if isinstance(idle, bool) or not isinstance(idle, int | float) or idle <= 0:
            raise ConfigError("limits.stream_idle_seconds must be a number of seconds, above 0")


@dataclass(frozen=True)
class TlsFiles:
    """The coordinator's mTLS identity and the consortium's trust: absolute paths."""

    ca_cert: Path
    cert: Path
    key: Path
    crl: Path | None = None


@dataclass(frozen=True)
class AnchorRef:
    """The published anchor: its identity and its artifact in the store."""

    digest: str  # the anchor's model-signing root digest (hex), what experts name
    artifact_digest: str  # "sha256:<hex>" of its tar stream in the store
    family: str


@dataclass(frozen=True)
class CoordinatorConfig:
    """A loaded ``coordinator.toml``; every path absolute."""

    root: Path
    listen: str
    database: str  # as written; see database_url
    tls: TlsFiles
    anchor: AnchorRef
    log_origin: str
    limits: Limits = field(default_factory=Limits)
    # The operator certificate that signs releases (model.sig); default: the TLS pair.
    release_cert: Path | None = None
    release_key: Path | None = None

    def __post_init__(self) -> None:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(
                f"listen address {self.listen!r} must be HOST:PORT, e.g. {DEFAULT_LISTEN}"
            )
        try:
            Checkpoint(self.log_origin, 0, b"\0" * 32)
        except CheckpointFormatError as err:
            raise ConfigError(f"log origin: {err}") from err

    @property
    def database_url(self) -> str:
        """The registry's SQLAlchemy URL (a relative SQLite path resolved against ``root``)."""
        return resolve_database(self.database, self.root)

    # --- the fixed layout
    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "tlog"

    @property
    def log_key(self) -> Path:
        return self.log_dir / "log-key.pem"

    @property
    def log_public_key(self) -> Path:
        return self.log_dir / "log-key.pub.pem"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def anchor_dir(self) -> Path:
        return self.root / "anchor"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def signer_cert(self) -> Path:
        return self.release_cert or self.tls.cert

    @property
    def signer_key(self) -> Path:
        return self.release_key or self.tls.key

    def to_toml(self) -> str:
        """The file ``init`` writes; :func:`load_config` reads it back to an equal config."""

        def path(p: Path) -> str:
            return _quote(str(p.relative_to(self.root) if p.is_relative_to(self.root) else p))

        lines = [
            "# flexfed coordinator: written by `flexfed coordinator init`.",
            "# Relative paths are relative to this file's directory.",
            f"format = {_quote(CONFIG_FORMAT)}",
            f"listen = {_quote(self.listen)}",
            "# any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/flexfed",
            f"database = {_quote(self.database)}",
            "",
            "[limits]",
            f"max_artifact_bytes = {self.limits.max_artifact_bytes}",
            f"max_chunk_bytes = {self.limits.max_chunk_bytes}",
            f"workers = {self.limits.workers}",
            f"grace_seconds = {float(self.limits.grace_seconds)}",
            f"stream_idle_seconds = {float(self.limits.stream_idle_seconds)}",
            "# Upload/Download streams one organisation may hold open at once, and the",
            "# threads kept free of transfers for the short calls (registry, audit, health)",
            f"streams_per_member = {self.limits.streams_per_member}",
            f"reserved_workers = {self.limits.reserved_workers}",
            f"max_concurrent_rpcs = {self.limits.max_concurrent_rpcs}",
            "# unfinished uploads one organisation may hold (CancelUpload frees one)",
            f"uploads_per_member = {self.limits.uploads_per_member}",
            "# days an uploaded bundle may wait for its submission before it is deleted",
            f"unsubmitted_days = {float(self.limits.unsubmitted_days)}",
            "",
            "[tls]",
            f"ca_cert = {path(self.tls.ca_cert)}",
            *([f"crl = {path(self.tls.crl)}"] if self.tls.crl else []),
            f"cert = {path(self.tls.cert)}",
            f"key = {path(self.tls.key)}",
            "",
            "[release]",
            "# the operator certificate and key that sign released models (default: [tls])",
            *([f"cert = {path(self.release_cert)}"] if self.release_cert else []),
            *([f"key = {path(self.release_key)}"] if self.release_key else []),
            "",
            "[log]",
            f"origin = {_quote(self.log_origin)}",
            "",
            "[anchor]",
            f"digest = {_quote(self.anchor.digest)}",
            f"artifact_digest = {_quote(self.anchor.artifact_digest)}",
            f"family = {_quote(self.anchor.family)}",
            "",
        ]
        return "\n".join(lines)


def _quote(text: str) -> str:
    # NOTE: a JSON string is a valid TOML basic string (same escapes, \uXXXX included).
    return json.dumps(text)


def _table(doc: Mapping[str, Any], name: str, where: Path) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: [{name}] must be a table")
    return value


def _str(table: Mapping[str, Any], key: str, where: str, default: str | None = None) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key} must be a non-empty string")
    return value


def _unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(extra)}")


def resolve_database(url: str, root: Path) -> str:
    """A SQLite URL with a relative path is relative to the coordinator directory."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite:///:memory:":
        path = Path(url[len(prefix) :])
        if not path.is_absolute():
            return prefix + str(root / path)
    return url


def load_config(root: Path | str) -> CoordinatorConfig:
    """Read ``DIR/coordinator.toml``; raise :class:`ConfigError` saying what to fix."""
    root = Path(root).resolve()
    where = root / CONFIG_FILE
    if not where.is_file():
        raise MissingFileError(
            f"{root} is not a coordinator directory (no {CONFIG_FILE}); make one with "
            "`flexfed coordinator init`"
        )
    try:
        doc = tomllib.loads(where.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{where} is not valid TOML: {err}") from err
    _unknown(doc, {"format", "listen", "database", "limits", "tls", "release", "log", "anchor"}, "")
    if doc.get("format") != CONFIG_FORMAT:
        raise ConfigError(f"{where}: format must be {CONFIG_FORMAT!r}, got {doc.get('format')!r}")

    def path(
        table: Mapping[str, Any], key: str, section: str, required: bool = True
    ) -> Path | None:
        if key not in table and not required:
            return None
        return root / _str(table, key, f"{where} [{section}]")

    limits_t = _table(doc, "limits", where)
    _unknown(limits_t, {*Limits.__dataclass_fields__}, f"{where} [limits]")
    tls_t = _table(doc, "tls", where)
    _unknown(tls_t, {"ca_cert", "crl", "cert", "key"}, f"{where} [tls]")
    release_t = _table(doc, "release", where)
    _unknown(release_t, {"cert", "key"}, f"{where} [release]")
    log_t = _table(doc, "log", where)
    _unknown(log_t, {"origin"}, f"{where} [log]")
    anchor_t = _table(doc, "anchor", where)
    _unknown(anchor_t, {"digest", "artifact_digest", "family"}, f"{where} [anchor]")
    release_cert = path(release_t, "cert", "release", required=False)
    release_key = path(release_t, "key", "release", required=False)
    if (release_cert is None) != (release_key is None):
        raise ConfigError(f"{where} [release]: give both cert and key, or neither")
    tls = TlsFiles(
        ca_cert=path(tls_t, "ca_cert", "tls"),  # type: ignore[arg-type]
        cert=path(tls_t, "cert", "tls"),  # type: ignore[arg-type]
        key=path(tls_t, "key", "tls"),  # type: ignore[arg-type]
        crl=path(tls_t, "crl", "tls", required=False),
    )
    anchor = AnchorRef(
        digest=_str(anchor_t, "digest", f"{where} [anchor]"),
        artifact_digest=_str(anchor_t, "artifact_digest", f"{where} [anchor]"),
        family=_str(anchor_t, "family", f"{where} [anchor]"),
    )
    try:
        limits = Limits(**limits_t)
    except TypeError as err:
        raise ConfigError(f"{where} [limits]: {err}") from err
    return CoordinatorConfig(
        root=root,
        listen=_str(doc, "listen", str(where), DEFAULT_LISTEN),
        database=_str(doc, "database", str(where), DEFAULT_DATABASE),
        tls=tls,
        anchor=anchor,
        log_origin=_str(log_t, "origin", f"{where} [log]"),
        limits=limits,
        release_cert=release_cert,
        release_key=release_key,
    )
