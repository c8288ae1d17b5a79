"""The transparency log's events about experts and releases, and how to read them.

The coordinator logs an ``expert-accepted`` entry when it accepts an expert
(:func:`accepted_event`), ``opt-out`` / ``opt-in`` entries when an owner withdraws or
re-admits experts (:func:`opt_out_event`), a ``revocation`` when the operator bans one, and an
``assembly-released`` entry per released model (its slots as :func:`release_slots` lists
them). An expert is withdrawn by a later revocation (final) or opt-out (until a later opt-in)
that targets it.

:mod:`flexfed.common.trust.release` appends these events and
:mod:`flexfed.common.trust.audit` checks a model against them; both read a log through
:class:`LogReader`. The log itself is generic (:mod:`flexfed.common.translog`); this module
is its vocabulary: :data:`EVENT_TYPES`, :func:`entry_bytes`, :func:`parse_entry` and
:func:`open_log`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Protocol

from flexfed.common.translog.entries import canonical_entry, parse_canonical
from flexfed.common.translog.filelog import FileLog
from flexfed.common.util.clock import utc_now_iso

EVENT_TYPES: Final = frozenset(
    {"expert-accepted", "opt-out", "opt-in", "revocation", "assembly-released"}
)


def entry_bytes(event: Mapping[str, Any]) -> bytes:
    """The log entry for a consortium event (canonical JSON; its type one of EVENT_TYPES)."""
    return canonical_entry(event, EVENT_TYPES)


def parse_entry(data: bytes) -> dict[str, Any]:
    """A consortium log entry back to its event, refusing anything not canonical or unknown."""
    return parse_canonical(data, EVENT_TYPES)


def open_log(path: Path | str) -> FileLog:
    """The consortium's transparency log file (created if absent), for its one writer."""
    return FileLog(path, types=EVENT_TYPES)


class LogReader(Protocol):
    """What the audit reads from a log (a :class:`~flexfed.common.translog.filelog.FileLog`)."""

    @property
    def size(self) -> int: ...
    def entry(self, index: int) -> bytes: ...
    def root(self, tree_size: int | None = None) -> bytes: ...
    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]: ...
    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]: ...


def accepted_event(record: Mapping[str, Any], anchor_digest: str, time: str) -> dict[str, Any]:
    """The ``expert-accepted`` entry for a slot record of assembly.json."""
    return {
        "type": "expert-accepted",
        "org": record["org"],
        "name": record["name"],
        "expert_sha256": record["expert_sha256"],
        "meta_sha256": record.get("meta_sha256"),
        "anchor_digest": anchor_digest,
        "data_commitment": record.get("data_commitment"),
        "time": time,
    }


def opt_out_event(
    org: str, name: str | None = None, expert_sha256: str | None = None, time: str | None = None
) -> dict[str, Any]:
    """An ``opt-out`` entry: every expert of ``org`` (or only the one named) leaves the pool.

    It withdraws experts accepted before it, until an ``opt-in`` of the same shape.
    """
    return {
        "type": "opt-out",
        "org": org,
        "name": name,
        "expert_sha256": expert_sha256,
        "time": time or utc_now_iso(),
    }


def _targets(event: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    """Whether an opt-out/opt-in/revocation event is about the expert of ``record``."""
    return (
        event.get("org") == record.get("org")
        and event.get("name") in (None, record.get("name"))
        and event.get("expert_sha256") in (None, record.get("expert_sha256"))
    )


def _is_acceptance(event: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    return event.get("type") == "expert-accepted" and all(
        event.get(k) == record.get(k) for k in ("org", "name", "expert_sha256")
    )


def _withdrawal(
    events: Sequence[Mapping[str, Any]], record: Mapping[str, Any], accepted: int
) -> tuple[str, int] | None:
    """The event that withdrew an expert after its acceptance at ``accepted``, if any.

    A revocation is final; an opt-out holds until a later opt-in.
    """
    out: tuple[str, int] | None = None
    for i in range(accepted + 1, len(events)):
        event = events[i]
        kind = event.get("type")
        if kind not in ("opt-out", "opt-in", "revocation") or not _targets(event, record):
            continue
        if kind == "revocation":
            return ("revocation", i)
        out = ("opt-out", i) if kind == "opt-out" else None
    return out


def _read_events(log: LogReader, size: int | None = None) -> list[dict[str, Any]]:
    return [parse_entry(log.entry(i)) for i in range(log.size if size is None else size)]


def release_slots(assembly: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The slots as the ``assembly-released`` entry lists them."""
    return [
        {k: s.get(k) for k in ("slot", "org", "name", "expert_sha256")}
        for s in assembly.get("slots", [])
    ]


__all__ = [
    "LogReader",
    "accepted_event",
    "opt_out_event",
    "release_slots",
]
