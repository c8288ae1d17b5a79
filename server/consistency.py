"""Registry, store and log agree: restored at startup (:func:`recover`), checked on demand.

The transparency log is the record of truth. Every change is appended to it first (durable)
and then written to the registry, so the only disagreement a crash can leave is a log entry
whose registry write never happened. :func:`recover` replays the log and finishes those:
an ``expert-accepted`` entry without its row gets the row (the entry carries every column),
an opt-out, opt-in or revocation sets the state the log says, and a release logged without
its row is finished from its staging directory if it survived, or recorded as lost.

:func:`check` (``flexfed coordinator check``) changes nothing and lists every disagreement:
rows without their entry, entries without their row, states that differ from the log's
replay, accepted experts or releases whose artifact is missing from the store, and an anchor
copy that is not the published one.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexfed.common.formats.archive import ArtifactKind
from flexfed.common.formats.checkpoint import read_json
from flexfed.common.trust.log_events import parse_entry
from flexfed.common.util.clock import as_utc, utc_now
from flexfed.server.coordinator import Coordinator
from flexfed.server.lifecycle import finish_release, release_dir
from flexfed.server.pipeline import record_of
from flexfed.server.registry import ExpertState, ReleaseRecord

logger = logging.getLogger(__name__)

_STATES = {
    "expert-accepted": ExpertState.ACCEPTED,
    "opt-in": ExpertState.ACCEPTED,
    "opt-out": ExpertState.OPTED_OUT,
    "revocation": ExpertState.REVOKED,
}


@dataclass
class LogReplay:
    """What the log says, entry by entry."""

    events: list[dict[str, Any]]
    accepted: dict[str, int] = field(default_factory=dict)  # expert_id -> acceptance entry
    states: dict[str, tuple[ExpertState, int, str]] = field(default_factory=dict)
    releases: list[int] = field(default_factory=list)  # assembly-released entries

    @classmethod
    def of(cls, coordinator: Coordinator) -> LogReplay:
        log = coordinator.log
        replay = cls([parse_entry(log.entry(i)) for i in range(log.size)])
        for i, event in enumerate(replay.events):
            kind, expert_id = event.get("type"), event.get("expert_id")
            if kind == "assembly-released":
                replay.releases.append(i)
            elif kind == "expert-accepted" and isinstance(expert_id, str):
                replay.accepted.setdefault(expert_id, i)
                replay.states[expert_id] = (ExpertState.ACCEPTED, i, str(event["time"]))
            elif (
                kind in _STATES
                and expert_id in replay.states
                and replay.states[expert_id][0] is not ExpertState.REVOKED  # revocation is final
            ):
                replay.states[expert_id] = (_STATES[kind], i, str(event["time"]))
        return replay

    def slot_ids(self, coordinator: Coordinator, index: int) -> list[str]:
        """The expert ids of a release's slots, matched to accepted entries before it."""
        ids: list[str] = []
        for slot in self.events[index].get("slots", [])[1:]:
            match = [
                expert_id
                for expert_id, i in self.accepted.items()
                if i < index
                and all(
                    self.events[i].get(k) == slot.get(k) for k in ("org", "name", "expert_sha256")
                )
            ]
            ids.append(match[-1] if match else "")
        return ids


def collect_unsubmitted(coordinator: Coordinator) -> list[str]:
    """Delete expert bundles uploaded but never submitted within ``limits.unsubmitted_days``.

    FIX (issue 12): a finished upload that was never submitted stayed forever; a member could
    fill the disk with them. A submitted bundle (accepted, opted out or revoked: the registry
    knows it) is never collected. Runs at startup, before serving (no submission can be
    checking a bundle meanwhile). Returns the digests removed.
    """
    c = coordinator
    cutoff = utc_now() - dt.timedelta(days=c.config.limits.unsubmitted_days)
    removed = []
    for info, created in c.store.stored():
        if info.kind != ArtifactKind.EXPERT_BUNDLE or c.registry.expert(info.digest) is not None:
            continue
        try:
            old = as_utc(dt.datetime.fromisoformat(created)) < cutoff
        except ValueError:
            old = True  # no readable time: older than anything we wrote
        if old:
            c.store.remove(info.digest)
            removed.append(info.digest)
    for digest in removed:
        logger.warning("collected %s: uploaded, never submitted", digest)
    return removed


def recover(coordinator: Coordinator) -> list[str]:
    """Finish what a crash left half-done; return one line per repair. Call before serving."""
    c = coordinator
    repairs: list[str] = []
    with c.lock:
        replay = LogReplay.of(c)
        for expert_id, index in replay.accepted.items():
            if c.registry.expert(expert_id) is None:
                c.registry.add_expert(record_of(replay.events[index], index))
                repairs.append(f"expert {expert_id}: registry row restored from log entry {index}")
        for expert_id, (state, index, time) in replay.states.items():
            row = c.registry.expert(expert_id)
            if row is not None and (row.state, row.state_log_index) != (state, index):
                c.registry.set_state(expert_id, state, index, time)
                repairs.append(
                    f"expert {expert_id}: state {row.state.value} -> {state.value} "
                    f"(log entry {index})"
                )
        for index in replay.releases:
            if c.registry.release_at(index) is None:
                repairs.append(_recover_release(c, replay, index))
    for line in repairs:
        logger.warning("recovery: %s", line)
    return repairs


def _recover_release(c: Coordinator, replay: LogReplay, index: int) -> str:
    version = c.registry.next_version()
    ids = replay.slot_ids(c, index)
    staged = release_dir(c, version) / "assembly.json"
    if staged.is_file():
        try:
            if _recorded_index(staged) == index:
                record = finish_release(c, version, ids)
                digest = record.model_artifact_digest
                return f"release v{version} (log entry {index}) finished: {digest}"
        except Exception as err:  # recovery goes on; the release is recorded as lost below
            logger.error("cannot finish release v%d from %s: %s", version, staged.parent, err)
    c.registry.add_release(
        ReleaseRecord(
            version=version,
            model_artifact_digest="",
            expert_ids=tuple(ids),
            top_k=0,
            log_index=index,
            released_at=str(replay.events[index].get("time", "")),
        )
    )
    return (
        f"release v{version} (log entry {index}) was interrupted and its model is lost; "
        "release again"
    )


def _recorded_index(assembly_json: Path) -> int | None:
    value = read_json(assembly_json, "assembly.json").get("release_log_index")
    return value if isinstance(value, int) else None


def check(coordinator: Coordinator, *, anchor: bool = True) -> list[str]:
    """Every disagreement between registry, store and log, one line each (empty: all agree)."""
    c = coordinator
    problems: list[str] = []
    with c.lock:
        replay = LogReplay.of(c)
        rows = {e.expert_id: e for e in c.registry.experts()}
        releases = c.registry.releases()
    for expert_id, row in rows.items():
        index = replay.accepted.get(expert_id)
        if index is None:
            problems.append(f"expert {expert_id}: in the registry but never accepted in the log")
        elif index != row.log_index:
            problems.append(
                f"expert {expert_id}: registry says log entry {row.log_index}, the log {index}"
            )
        if expert_id in replay.states and replay.states[expert_id][0] is not row.state:
            problems.append(
                f"expert {expert_id}: registry state {row.state.value}, the log's "
                f"{replay.states[expert_id][0].value}"
            )
        if row.state is not ExpertState.REVOKED and expert_id not in c.store:
            problems.append(f"expert {expert_id}: its bundle is missing from the store")
    for expert_id, index in replay.accepted.items():
        if expert_id not in rows:
            problems.append(
                f"expert {expert_id}: accepted at log entry {index}, not in the registry"
            )
    by_index = {r.log_index: r for r in releases}
    for index in replay.releases:
        if index not in by_index:
            problems.append(f"log entry {index}: a release the registry does not know")
    for r in releases:
        if r.log_index not in replay.releases:
            problems.append(f"release v{r.version}: log entry {r.log_index} is not its release")
        if not r.model_artifact_digest:
            # NOTE: not a disagreement: recovery recorded the loss in the registry, and the log
            # keeps the release entry (a model nobody received). Releasing again supersedes it.
            logger.warning(
                "release v%d: its model was lost in an interrupted release (recorded)", r.version
            )
        elif r.model_artifact_digest not in c.store:
            problems.append(
                f"release v{r.version}: model {r.model_artifact_digest} not in the store"
            )
    stored = c.registry.anchor()
    ref = c.config.anchor
    if stored is None or (stored.digest, stored.artifact_digest) != (
        ref.digest,
        ref.artifact_digest,
    ):
        problems.append("anchor: the registry's anchor is not the one coordinator.toml publishes")
    if ref.artifact_digest not in c.store:
        problems.append(f"anchor: artifact {ref.artifact_digest} is missing from the store")
    if anchor and c.anchor.digest != ref.digest:
        problems.append(f"anchor: {c.config.anchor_dir} is not the published anchor")
    return problems
