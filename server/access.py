"""Who may read which artifact: the policy ``GetArtifact`` and ``Download`` apply.

Before it, any member could download any accepted bundle by its digest, also after its
owner opted out or was revoked, and every old release stayed downloadable by everyone. An
owner's expert is its data's distillate: it goes to nobody but its owner and the operator.

- **the anchor**: every member (it is public to the consortium);
- **an expert bundle**: its organisation (as submitted, or as uploaded while not yet
  submitted) and the operator. Auditors audit releases, which carry what the audit needs
  (each slot's rebuild files and signed metadata), so they need no bundle;
- **a released model**: the operator and auditors always (an audit must be able to check
  what was released, also later); owners while every expert it holds is still accepted. A
  release that holds an expert since opted out or revoked is no longer served to owners:
  they fetch a newer release (the operator releases one after every opt-out);
- anything else in the store (an unreleased model, a bundle nobody claims): the operator.
"""

from __future__ import annotations

from flexfed.common.formats.archive import ArtifactInfo, ArtifactKind
from flexfed.server.auth import Caller
from flexfed.server.coordinator import Coordinator
from flexfed.server.registry import ExpertState


class ReadPolicy:
    """Decides for one coordinator whether a caller may read an artifact."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    def refusal(self, caller: Caller, info: ArtifactInfo) -> str | None:
        """Why ``caller`` may not read ``info``, or None."""
        if caller.role == "operator" or info.kind == ArtifactKind.ANCHOR:
            return None
        registry = self.coordinator.registry
        if info.kind == ArtifactKind.EXPERT_BUNDLE:
            expert = registry.expert(info.digest)
            org = expert.org if expert is not None else self.coordinator.store.uploader(info.digest)
            if caller.role == "owner" and org == caller.org:
                return None
            return f"expert bundle {info.digest} is served to its own organisation only"
        if info.kind == ArtifactKind.MODEL:
            release = next(
                (r for r in registry.releases() if r.model_artifact_digest == info.digest), None
            )
            if release is None:
                return f"model {info.digest} is not a release"
            if caller.role == "auditor":
                return None
            withdrawn = [
                e
                for e in (registry.expert(i) for i in release.expert_ids)
                if e is None or e.state is not ExpertState.ACCEPTED
            ]
            if withdrawn:
                return (
                    f"release {release.version} holds an expert that was since opted out or "
                    "revoked; fetch a newer release"
                )
            return None
        return f"{info.digest} is not served to {caller.role}s"
