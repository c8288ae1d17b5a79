"""The registry: which experts the consortium accepted, their state, and its releases.

SQLAlchemy 2.x over any URL (SQLite by default, PostgreSQL by URL). The transparency log is
the record of truth; the registry is its queryable index, written *after* each log append and
reconciled from the log at startup (:mod:`flexfed.server.coordinator`). Every method is one
transaction; a :class:`Registry` is safe to share between the server's threads (each call
opens its own session). Records leave as frozen dataclasses, never as live ORM objects.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, Integer, String, Text, create_engine, event, make_url, select
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from flexfed.common.errors import ConfigError, InvalidInputError

logger = logging.getLogger(__name__)


class ExpertState(StrEnum):
    ACCEPTED = "accepted"
    OPTED_OUT = "opted_out"
    REVOKED = "revoked"


class UnknownExpertError(InvalidInputError, LookupError):
    """No expert has this id."""


class _Base(DeclarativeBase):
    pass


# NOTE: the columns below that hold what a signer or the clock wrote (signer, times) are
# unbounded: they are written *after* the log append, and PostgreSQL (unlike SQLite) refuses a
# VARCHAR(n) value longer than n, e.g. an owner's valid RFC 3339 time with nanoseconds, which
# would leave a log entry that recovery could never apply. SQLite stores both the same way.


class _Expert(_Base):
    __tablename__ = "experts"

    expert_id: Mapped[str] = mapped_column(String(80), primary_key=True)  # bundle artifact digest
    org: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    log_index: Mapped[int] = mapped_column(Integer, unique=True)  # the expert-accepted entry
    anchor_digest: Mapped[str] = mapped_column(String(64))
    data_commitment: Mapped[str] = mapped_column(String(64))
    expert_sha256: Mapped[str] = mapped_column(String(64))
    meta_sha256: Mapped[str] = mapped_column(String(64))
    signer: Mapped[str] = mapped_column(Text)
    submitted_at: Mapped[str] = mapped_column(Text)
    # The entry that set the current state, and the owner statement's time (replay guard).
    state_log_index: Mapped[int] = mapped_column(Integer)
    state_time: Mapped[str] = mapped_column(Text)


class _Release(_Base):
    __tablename__ = "releases"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_artifact_digest: Mapped[str] = mapped_column(String(80))  # "" if the model was lost
    expert_ids: Mapped[str] = mapped_column(Text)  # JSON list, slot order
    top_k: Mapped[int] = mapped_column(Integer)
    log_index: Mapped[int] = mapped_column(Integer, unique=True)  # assembly-released entry
    released_at: Mapped[str] = mapped_column(Text)


class _Anchor(_Base):
    __tablename__ = "anchor"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: one anchor
    digest: Mapped[str] = mapped_column(String(64))
    artifact_digest: Mapped[str] = mapped_column(String(80))
    family: Mapped[str] = mapped_column(String(32))


@dataclass(frozen=True)
class ExpertRecord:
    expert_id: str
    org: str
    name: str
    state: ExpertState
    log_index: int
    anchor_digest: str
    data_commitment: str
    expert_sha256: str
    meta_sha256: str
    signer: str
    submitted_at: str
    state_log_index: int = -1  # -1: the acceptance itself
    state_time: str = ""

    def __post_init__(self) -> None:
        if self.state_log_index < 0:
            object.__setattr__(self, "state_log_index", self.log_index)
        if not self.state_time:
            object.__setattr__(self, "state_time", self.submitted_at)


@dataclass(frozen=True)
class ReleaseRecord:
    version: int
    model_artifact_digest: str
    expert_ids: tuple[str, ...]
    top_k: int
    log_index: int
    released_at: str


@dataclass(frozen=True)
class AnchorRecord:
    digest: str
    artifact_digest: str
    family: str


def _expert(row: _Expert) -> ExpertRecord:
    return ExpertRecord(
        expert_id=row.expert_id,
        org=row.org,
        name=row.name,
        state=ExpertState(row.state),
        log_index=row.log_index,
        anchor_digest=row.anchor_digest,
        data_commitment=row.data_commitment,
        expert_sha256=row.expert_sha256,
        meta_sha256=row.meta_sha256,
        signer=row.signer,
        submitted_at=row.submitted_at,
        state_log_index=row.state_log_index,
        state_time=row.state_time,
    )


def _release(row: _Release) -> ReleaseRecord:
    return ReleaseRecord(
        version=row.version,
        model_artifact_digest=row.model_artifact_digest,
        expert_ids=tuple(json.loads(row.expert_ids)),
        top_k=row.top_k,
        log_index=row.log_index,
        released_at=row.released_at,
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # NOTE: WAL lets readers (List*, Get*) run while a submission writes; synchronous=FULL
    # makes each commit durable, which recovery relies on no more than the log does.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def display_url(url: str) -> str:
    """``url`` without its password (``***``), for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url if "@" not in url else "<unparsable database URL>"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL mode and may be used from any thread."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False})
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as err:
        raise ConfigError(
            f"registry database URL {display_url(url)!r} is not usable: {err}"
        ) from err
    return engine


class Registry:
    """The registry at a database URL (tables are created if missing)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        try:
            _Base.metadata.create_all(self.engine)
        except DBAPIError as err:
            # NOTE: OperationalError (unreachable, no such database, bad password) and, on
            # servers, ProgrammingError (no CREATE permission) alike.
            raise ConfigError(
                f"cannot open the registry database {display_url(url)}: {err.orig}"
            ) from err
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    # --- the anchor
    def set_anchor(self, anchor: AnchorRecord) -> None:
        with self._tx() as s:
            s.merge(_Anchor(id=1, **anchor.__dict__))

    def anchor(self) -> AnchorRecord | None:
        with self._tx() as s:
            row = s.get(_Anchor, 1)
            return AnchorRecord(row.digest, row.artifact_digest, row.family) if row else None

    # --- experts
    def add_expert(self, record: ExpertRecord) -> ExpertRecord:
        """Insert an accepted expert; an existing row with this id is returned unchanged."""
        try:
            with self._tx() as s:
                row = s.get(_Expert, record.expert_id)
                if row is not None:
                    return _expert(row)
                values = {**record.__dict__, "state": record.state.value}
                s.add(_Expert(**values))
        except IntegrityError:
            # NOTE: another session inserted this id between our read and our insert (under
            # PostgreSQL's READ COMMITTED, or SQLite's deferred transactions): theirs stands.
            existing = self.expert(record.expert_id)
            if existing is None:
                raise
            return existing
        return record

    def expert(self, expert_id: str) -> ExpertRecord | None:
        with self._tx() as s:
            row = s.get(_Expert, expert_id)
            return _expert(row) if row else None

    def require_expert(self, expert_id: str) -> ExpertRecord:
        record = self.expert(expert_id)
        if record is None:
            raise UnknownExpertError(f"no expert {expert_id!r} in the registry")
        return record

    def experts(
        self, org: str | None = None, state: ExpertState | None = None
    ) -> list[ExpertRecord]:
        """Experts in acceptance (log) order, optionally of one org or state."""
        query = select(_Expert).order_by(_Expert.log_index)
        if org:
            query = query.where(_Expert.org == org)
        if state is not None:
            query = query.where(_Expert.state == state.value)
        with self._tx() as s:
            return [_expert(r) for r in s.scalars(query)]

    def with_weights(self, expert_sha256: str) -> list[ExpertRecord]:
        """Every expert, of any org and state, whose weights file has this SHA-256."""
        query = select(_Expert).where(_Expert.expert_sha256 == expert_sha256)
        with self._tx() as s:
            return [_expert(r) for r in s.scalars(query.order_by(_Expert.log_index))]

    def set_state(
        self, expert_id: str, state: ExpertState, log_index: int, time: str
    ) -> ExpertRecord:
        with self._tx() as s:
            row = s.get(_Expert, expert_id)
            if row is None:
                raise UnknownExpertError(f"no expert {expert_id!r} in the registry")
            row.state, row.state_log_index, row.state_time = state.value, log_index, time
            return _expert(row)

    # --- releases
    def add_release(self, release: ReleaseRecord) -> ReleaseRecord:
        """Insert a release; its version must be the next one (a clash raises ConfigError)."""
        try:
            with self._tx() as s:
                s.add(
                    _Release(
                        version=release.version,
                        model_artifact_digest=release.model_artifact_digest,
                        expert_ids=json.dumps(list(release.expert_ids)),
                        top_k=release.top_k,
                        log_index=release.log_index,
                        released_at=release.released_at,
                    )
                )
        except IntegrityError as err:
            raise ConfigError(
                f"release {release.version} (log entry {release.log_index}) clashes with one "
                f"already in the registry: {err.orig}"
            ) from err
        return release

    def releases(self) -> list[ReleaseRecord]:
        with self._tx() as s:
            return [_release(r) for r in s.scalars(select(_Release).order_by(_Release.version))]

    def release_at(self, log_index: int) -> ReleaseRecord | None:
        with self._tx() as s:
            row = s.scalars(select(_Release).where(_Release.log_index == log_index)).first()
            return _release(row) if row else None

    def next_version(self) -> int:
        releases = self.releases()
        return releases[-1].version + 1 if releases else 1
