"""What happens to accepted experts: opt-out and opt-in, revocation, and releases.

Every change is logged first and then written to the registry, under the coordinator's lock (as
submissions are), so :func:`flexfed.server.consistency.recover` can finish any change a crash
interrupted from the log alone. The events have the shapes of :mod:`flexfed.common.trust.log_events`
(what :func:`~flexfed.common.trust.audit.audit_model` reads) plus the ``expert_id`` the registry is
keyed by:

- ``opt-out`` / ``opt-in``: the owner's signed statement, its signature and certificate, so
  anyone reading the log can check that the owner asked;
- ``revocation``: by the operator, with a reason; final;
- ``assembly-released``: written by :func:`~flexfed.common.trust.release.record_release`.

A release assembles every accepted expert (or the ones named) in acceptance order, in a
staging directory, records it in the log, signs it as the coordinator, and only then puts the
model into the store and adds the registry row: nothing half-made is ever visible.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexfed.common.errors import AssemblyError, InvalidInputError, VerificationError
from flexfed.common.formats.archive import ArtifactKind, extract_archive
from flexfed.common.formats.bundle import SIGNATURE
from flexfed.common.formats.checkpoint import read_json
from flexfed.common.moe.assembly import ASSEMBLY_FILE, DEFAULT_TOP_K, assemble
from flexfed.common.trust.log_events import opt_out_event, parse_entry
from flexfed.common.trust.owner_request import SignedOwnerRequest, verify_owner_request
from flexfed.common.trust.pki import CertificateRevokedError, verify_chain
from flexfed.common.trust.release import RELEASE_SIGNATURE, record_release, sign_release
from flexfed.common.trust.signing import BundleVerifier
from flexfed.common.util.clock import utc_now_iso
from flexfed.server.coordinator import Coordinator
from flexfed.server.failpoints import failpoint
from flexfed.server.pipeline import CallerOrgError
from flexfed.server.registry import (
    ExpertRecord,
    ExpertState,
    ReleaseRecord,
)

logger = logging.getLogger(__name__)

_TARGET = {"opt-out": ExpertState.OPTED_OUT, "opt-in": ExpertState.ACCEPTED}
_FROM = {"opt-out": ExpertState.ACCEPTED, "opt-in": ExpertState.OPTED_OUT}


class StateError(InvalidInputError):
    """The expert is not in a state that allows this change (e.g. revoked)."""


class StaleRequestError(StateError):
    """An owner request older than the expert's last change: a replay or out of order."""


@dataclass(frozen=True)
class Change:
    """An expert after a change, and the log entry that made it."""

    expert: ExpertRecord
    log_index: int
    logged: bool  # False: it already was in that state (nothing new was logged)


def _event(kind: str, expert: ExpertRecord, time: str, **extra: Any) -> dict[str, Any]:
    event = opt_out_event(expert.org, expert.name, expert.expert_sha256, time)
    event.update(type=kind, expert_id=expert.expert_id, **extra)
    return event


def owner_request(
    coordinator: Coordinator, action: str, request: SignedOwnerRequest, caller_org: str | None
) -> Change:
    """Apply a signed opt-out or opt-in; ``caller_org`` None is the operator."""
    statement = verify_owner_request(
        request, action, coordinator.ca_cert, coordinator.current_crl()
    )
    if caller_org is not None and caller_org != statement.org:
        raise CallerOrgError(f"{caller_org!r} may not send {statement.org!r}'s requests")
    c = coordinator
    with c.lock:
        expert = c.registry.require_expert(statement.expert_id)
        if expert.org != statement.org:
            raise CallerOrgError(
                f"expert {expert.expert_id} belongs to {expert.org!r}, not {statement.org!r}"
            )
        if expert.state is _TARGET[action]:
            return Change(expert, expert.state_log_index, logged=False)
        if expert.state is not _FROM[action]:
            raise StateError(f"expert {expert.expert_id} is {expert.state.value}; cannot {action}")
        if _parse_time(statement.time) <= _parse_time(expert.state_time):
            raise StaleRequestError(
                f"the {action} request of {statement.time} is not newer than the expert's last "
                f"change ({expert.state_time}); sign a fresh one"
            )
        event = _event(
            action,
            expert,
            statement.time,
            signer=str(statement.signer),
            statement=request.statement.decode("utf-8"),
            signature=base64.b64encode(request.signature).decode("ascii"),
            certificate=request.certificate_pem.decode("ascii"),
        )
        index = c.log.append(event)
        updated = c.after_log(
            lambda: c.registry.set_state(expert.expert_id, _TARGET[action], index, statement.time),
            f"{action} of {expert.expert_id}",
        )
    logger.info(
        "%s: %s/%s (%s), log entry %d", action, expert.org, expert.name, expert.expert_id, index
    )
    return Change(updated, index, logged=True)


def _parse_time(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text)
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def revoke(coordinator: Coordinator, expert_id: str, reason: str, operator: str) -> Change:
    """The operator removes an expert for good (a revoked expert never returns)."""
    c = coordinator
    with c.lock:
        expert = c.registry.require_expert(expert_id)
        if expert.state is ExpertState.REVOKED:
            return Change(expert, expert.state_log_index, logged=False)
        time = utc_now_iso()
        index = c.log.append(
            _event("revocation", expert, time, reason=reason or "unspecified", signer=operator)
        )
        updated = c.after_log(
            lambda: c.registry.set_state(expert_id, ExpertState.REVOKED, index, time),
            f"revocation of {expert_id}",
        )
    logger.info("revoked %s (log entry %d): %s", expert_id, index, reason)
    return Change(updated, index, logged=True)


def _revoked_signer(c: Coordinator, expert: ExpertRecord, bundle: Path) -> str | None:
    """Why the current CRL voids the certificate that signed ``bundle``, judged at the
    expert's acceptance time as the audit judges it (a superseded key that signed before its
    revocation stays good), or None."""
    crl = c.current_crl()
    if crl is None:
        return None
    signature = bundle / SIGNATURE
    try:
        _, leaf = BundleVerifier(c.ca_cert)._read_signature(signature, signature.stat().st_size)
        verify_chain(leaf, c.ca_cert, _parse_time(expert.submitted_at), crl, roles=("owner",))
    except CertificateRevokedError as err:
        return str(err)
    except (OSError, VerificationError) as err:  # accepted once, so this is not expected
        logger.warning("cannot re-check the signer of %s: %s", expert.expert_id, err)
    return None


def release_dir(coordinator: Coordinator, version: int) -> Path:
    """Where release ``version`` is finished (recovery looks here after a crash)."""
    return coordinator.config.staging_dir / f"release-v{version}"


def release(
    coordinator: Coordinator, expert_ids: Sequence[str] = (), top_k: int = 0
) -> ReleaseRecord:
    """Assemble, log, sign and store a release of the accepted experts (or those named)."""
    c = coordinator
    if expert_ids:
        chosen = [c.registry.require_expert(e) for e in dict.fromkeys(expert_ids)]
        idle = [e for e in chosen if e.state is not ExpertState.ACCEPTED]
        if idle:
            raise StateError(
                f"expert {idle[0].expert_id} is {idle[0].state.value}; only accepted experts "
                "can be released"
            )
        chosen.sort(key=lambda e: e.log_index)
    else:
        chosen = c.registry.experts(state=ExpertState.ACCEPTED)
    requested = top_k or DEFAULT_TOP_K
    work = c.staging("assemble")
    try:
        bundles = []
        kept = []
        for i, expert in enumerate(chosen):
            bundle = extract_archive(c.store.path(expert.expert_id), work / f"expert-{i}")
            revoked = _revoked_signer(c, expert, bundle)
            if revoked is not None:
                # FIX (issue 12): an expert whose signer's key was revoked for compromise was
                # still released (the release then failed its own audit). The current CRL
                # decides: the expert is revoked, with a log entry, and left out.
                revoke(c, expert.expert_id, f"signer certificate revoked: {revoked}", "crl")
                if expert_ids:
                    raise StateError(
                        f"expert {expert.expert_id} was revoked: its signer's certificate is "
                        f"revoked ({revoked}); release without it"
                    )
                logger.warning("left %s out of the release: %s", expert.expert_id, revoked)
                continue
            bundles.append(bundle)
            kept.append(expert)
        chosen = kept
        assemble(c.anchor, bundles, work / "model", top_k=requested)
        # NOTE: assembly (the slow part) ran without the lock; an opt-out or revocation that
        # landed meanwhile makes record_release refuse, since it reads the log itself.
        with c.lock:
            version = c.registry.next_version()
            final = release_dir(c, version)
            if final.exists():
                shutil.rmtree(final)
            os.rename(work / "model", final)
            failpoint("release-after-assembly")  # crash tests: assembled in staging, not logged
            record_release(final, c.log, c.log_key, c.config.log_origin)
            failpoint("release-after-log")  # crash tests: logged, not signed/stored/registered
            return finish_release(c, version, [e.expert_id for e in chosen])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finish_release(
    coordinator: Coordinator, version: int, expert_ids: Sequence[str]
) -> ReleaseRecord:
    """Sign a recorded release in its staging directory, store it and add its row.

    Also what recovery calls for a release whose log entry exists but whose row does not.
    """
    c = coordinator
    model = release_dir(c, version)
    assembly = read_json(model / ASSEMBLY_FILE, ASSEMBLY_FILE)
    index = assembly.get("release_log_index")
    if not isinstance(index, int):
        raise AssemblyError(f"{model} was never recorded in the log")
    if not (model / RELEASE_SIGNATURE).exists():
        sign_release(model, c.config.signer_key, c.config.signer_cert, [c.config.tls.ca_cert])
    info = c.store.put_directory(model, ArtifactKind.MODEL)
    record = c.registry.add_release(
        ReleaseRecord(
            version=version,
            model_artifact_digest=info.digest,
            expert_ids=tuple(expert_ids),
            top_k=int(assembly["top_k"]),
            log_index=index,
            released_at=str(_release_time(c, index)),
        )
    )
    shutil.rmtree(model, ignore_errors=True)
    logger.info(
        "released v%d: %s (%d experts, log entry %d)", version, info.digest, len(expert_ids), index
    )
    return record


def _release_time(c: Coordinator, index: int) -> str:
    return str(parse_entry(c.log.entry(index)).get("time") or utc_now_iso())
