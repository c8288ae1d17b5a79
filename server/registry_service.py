"""``RegistryService``: the Consortium API's registry, over a :class:`Coordinator`.

Who may call what (the operator may call everything):

- ``GetAnchor``, ``ListExperts``, ``GetExpert``, ``ListReleases``: any member;
- ``SubmitExpert``, ``OptOut``, ``OptIn``: owners, for their own organisation's experts;
- ``RevokeExpert``, ``ReleaseModel``: the operator.

Handlers do no work of their own: the pipeline and :mod:`flexfed.server.lifecycle` do it,
and :func:`_status` turns their errors into gRPC status codes. A submission that is refused
for what the bundle *is* is not an error: it answers ``accepted=false`` with a reason code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import grpc

from flexfed.common.errors import FlexfedError
from flexfed.common.trust.owner_request import (
    MalformedOwnerRequestError,
    OwnerRequestError,
    SignedOwnerRequest,
)
from flexfed.common.trust.pki import CertificateError, CrlError
from flexfed.common.trust.release import ReleaseStateError
from flexfed.proto.v1 import audit_pb2, registry_pb2, registry_pb2_grpc
from flexfed.server.auth import Authorizer, Caller, abort, status_of
from flexfed.server.consistency import recover
from flexfed.server.coordinator import Coordinator
from flexfed.server.lifecycle import Change, StaleRequestError, StateError, owner_request
from flexfed.server.lifecycle import release as release_model
from flexfed.server.lifecycle import revoke as revoke_expert
from flexfed.server.pipeline import CallerOrgError, SubmissionPipeline
from flexfed.server.registry import ExpertRecord, ExpertState, ReleaseRecord, UnknownExpertError

logger = logging.getLogger(__name__)
T = TypeVar("T")

_STATE_TO_PROTO = {
    ExpertState.ACCEPTED: registry_pb2.EXPERT_STATE_ACCEPTED,
    ExpertState.OPTED_OUT: registry_pb2.EXPERT_STATE_OPTED_OUT,
    ExpertState.REVOKED: registry_pb2.EXPERT_STATE_REVOKED,
}
_STATE_FROM_PROTO = {v: k for k, v in _STATE_TO_PROTO.items()}


# --- conversions ---------------------------------------------------------------------------


def expert_message(e: ExpertRecord) -> registry_pb2.Expert:
    return registry_pb2.Expert(
        expert_id=e.expert_id,
        org=e.org,
        name=e.name,
        state=_STATE_TO_PROTO[e.state],
        log_index=e.log_index,
        anchor_digest=e.anchor_digest,
        data_commitment=e.data_commitment,
        submitted_at=e.submitted_at,
        signer=e.signer,
    )


def release_message(r: ReleaseRecord) -> registry_pb2.Release:
    return registry_pb2.Release(
        version=r.version,
        model_artifact_digest=r.model_artifact_digest,
        expert_ids=list(r.expert_ids),
        top_k=r.top_k,
        log_index=r.log_index,
        released_at=r.released_at,
    )


def checkpoint_message(coordinator: Coordinator) -> audit_pb2.SignedCheckpoint:
    return audit_pb2.SignedCheckpoint(text=coordinator.checkpoint().to_text().encode("utf-8"))


def _status(err: FlexfedError) -> grpc.StatusCode:
    if isinstance(err, CallerOrgError | OwnerRequestError | CertificateError):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(err, UnknownExpertError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(err, StaleRequestError | StateError | ReleaseStateError | CrlError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(err, MalformedOwnerRequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return status_of(err)


def _run(context: grpc.ServicerContext, what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except FlexfedError as err:
        logger.info("%s refused: %s: %s", what, type(err).__name__, err)
        abort(context, _status(err), str(err))


# --- the service ---------------------------------------------------------------------------


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """The registry half of the Consortium API."""

    def __init__(
        self,
        coordinator: Coordinator,
        authorizer: Authorizer,
        pipeline: SubmissionPipeline | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.auth = authorizer
        self.pipeline = pipeline or SubmissionPipeline(coordinator)

    @staticmethod
    def _org_of(caller: Caller) -> str | None:
        return None if caller.role == "operator" else caller.org

    def GetAnchor(
        self, request: registry_pb2.GetAnchorRequest, context: grpc.ServicerContext
    ) -> registry_pb2.Anchor:
        self.auth.require(context, "owner", "auditor")
        ref = self.coordinator.config.anchor
        return registry_pb2.Anchor(
            digest=ref.digest, artifact_digest=ref.artifact_digest, family=ref.family
        )

    def SubmitExpert(
        self, request: registry_pb2.SubmitExpertRequest, context: grpc.ServicerContext
    ) -> registry_pb2.SubmitExpertResponse:
        caller = self.auth.require(context, "owner")
        self._repair()
        result = _run(
            context,
            "SubmitExpert",
            lambda: self.pipeline.submit(request.artifact_digest, self._org_of(caller)),
        )
        if not result.accepted or result.expert is None:
            return registry_pb2.SubmitExpertResponse(
                accepted=False, reason_code=result.reason_code, reason=result.reason
            )
        snap = self.coordinator.proof_of(result.expert.log_index)
        return registry_pb2.SubmitExpertResponse(
            accepted=True,
            expert=expert_message(result.expert),
            inclusion=audit_pb2.InclusionProof(
                leaf_index=result.expert.log_index, tree_size=snap.tree_size, hashes=snap.proof
            ),
            checkpoint=audit_pb2.SignedCheckpoint(text=snap.checkpoint.to_text().encode()),
        )

    def ListExperts(
        self, request: registry_pb2.ListExpertsRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListExpertsResponse:
        self.auth.require(context, "owner", "auditor")
        state = _STATE_FROM_PROTO.get(request.state)
        experts = self.coordinator.registry.experts(org=request.org or None, state=state)
        return registry_pb2.ListExpertsResponse(experts=[expert_message(e) for e in experts])

    def GetExpert(
        self, request: registry_pb2.GetExpertRequest, context: grpc.ServicerContext
    ) -> registry_pb2.Expert:
        self.auth.require(context, "owner", "auditor")
        record = _run(
            context,
            "GetExpert",
            lambda: self.coordinator.registry.require_expert(request.expert_id),
        )
        return expert_message(record)

    def _owner_request(
        self, action: str, request: registry_pb2.OwnerRequest, context: grpc.ServicerContext
    ) -> registry_pb2.OwnerRequestResponse:
        caller = self.auth.require(context, "owner")
        self._repair()
        signed = SignedOwnerRequest.from_proto(request)
        change: Change = _run(
            context,
            action,
            lambda: owner_request(self.coordinator, action, signed, self._org_of(caller)),
        )
        return self._change_message(change)

    def _change_message(self, change: Change) -> registry_pb2.OwnerRequestResponse:
        """The answer to a logged state change: the expert now, its entry, a checkpoint."""
        return registry_pb2.OwnerRequestResponse(
            expert=expert_message(change.expert),
            log_index=change.log_index,
            checkpoint=checkpoint_message(self.coordinator),
        )

    def _repair(self) -> None:
        """Replay the log into the registry first if a change was left half done."""
        c = self.coordinator
        if c.needs_recovery:
            with c.lock:
                for line in recover(c):
                    logger.warning("recovery after a failed registry write: %s", line)
                c.needs_recovery = False

    def OptOut(
        self, request: registry_pb2.OwnerRequest, context: grpc.ServicerContext
    ) -> registry_pb2.OwnerRequestResponse:
        return self._owner_request("opt-out", request, context)

    def OptIn(
        self, request: registry_pb2.OwnerRequest, context: grpc.ServicerContext
    ) -> registry_pb2.OwnerRequestResponse:
        return self._owner_request("opt-in", request, context)

    def RevokeExpert(
        self, request: registry_pb2.RevokeExpertRequest, context: grpc.ServicerContext
    ) -> registry_pb2.OwnerRequestResponse:
        caller = self.auth.require(context)
        self._repair()
        change: Change = _run(
            context,
            "RevokeExpert",
            lambda: revoke_expert(self.coordinator, request.expert_id, request.reason, str(caller)),
        )
        return self._change_message(change)

    def ReleaseModel(
        self, request: registry_pb2.ReleaseRequest, context: grpc.ServicerContext
    ) -> registry_pb2.Release:
        self.auth.require(context)
        self._repair()
        record = _run(
            context,
            "ReleaseModel",
            lambda: release_model(self.coordinator, list(request.expert_ids), request.top_k),
        )
        return release_message(record)

    def ListReleases(
        self, request: registry_pb2.ListReleasesRequest, context: grpc.ServicerContext
    ) -> registry_pb2.ListReleasesResponse:
        self.auth.require(context, "owner", "auditor")
        releases = self.coordinator.registry.releases()
        return registry_pb2.ListReleasesResponse(releases=[release_message(r) for r in releases])
