"""A data owner's (or auditor's) side of the Consortium API: the calls behind ``flexfed client``.

:class:`ConsortiumClient` holds one mutual-TLS channel to the coordinator and offers the verbs
an owner needs: fetch the anchor, submit an expert (upload with resume, then submission, then
a check of the inclusion proof the coordinator answers with), opt out or back in (requests
signed with the owner's key), and list the registry. Every failure is a :class:`FlexfedError`
with one clear line: a refusal by the coordinator carries its reason code.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.api.tls import secure_channel
from flexfed.common.errors import ConfigError, FlexfedError, TransferError, VerificationError
from flexfed.common.formats.anchor import Anchor, open_anchor
from flexfed.common.translog.checkpoint import SignedCheckpoint, load_public_key, verify_checkpoint
from flexfed.common.translog.merkle import leaf_hash, verify_inclusion
from flexfed.proto.v1 import (
    artifact_pb2,
    audit_pb2,
    audit_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

log = logging.getLogger(__name__)

# Environment variables that stand in for the connection options.
ENV = {
    "address": "FLEXFED_COORDINATOR",
    "ca": "FLEXFED_CA",
    "cert": "FLEXFED_CERT",
    "key": "FLEXFED_KEY",
}


class SubmissionRefusedError(VerificationError):
    """The coordinator verified the expert and refused it; ``reason_code`` says why."""

    def __init__(self, reason_code: str, reason: str) -> None:
        super().__init__(f"refused ({reason_code}): {reason}")
        self.reason_code = reason_code


class CoordinatorError(TransferError):
    """A call to the coordinator failed; the gRPC status code is kept."""

    def __init__(self, what: str, err: grpc.RpcError) -> None:
        code = err.code() if isinstance(err, grpc.Call) else None
        details = err.details() if isinstance(err, grpc.Call) else str(err)
        name = code.name if code is not None else "UNKNOWN"
        super().__init__(f"{what}: the coordinator answered {name}: {details}")
        self.code = code


@dataclass(frozen=True)
class Connection:
    """Where the coordinator is and who we are (our certificate, its key, the CA)."""

    address: str  # host:port
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def resolve(
        cls,
        address: str | None,
        ca: Path | None,
        cert: Path | None,
        key: Path | None,
    ) -> Connection:
        """From options, falling back to the FLEXFED_* environment variables."""
        values: dict[str, object] = {"address": address, "ca": ca, "cert": cert, "key": key}
        for name, var in ENV.items():
            if values[name] is None and os.environ.get(var):
                values[name] = os.environ[var]
        missing = [
            f"--{n.replace('address', 'coordinator')} (or ${ENV[n]})"
            for n, v in values.items()
            if v is None
        ]
        if missing:
            raise ConfigError(f"connecting to the coordinator needs {', '.join(missing)}")
        return cls(
            address=str(values["address"]),
            ca=Path(str(values["ca"])),
            cert=Path(str(values["cert"])),
            key=Path(str(values["key"])),
        )


@dataclass(frozen=True)
class Submission:
    """An accepted expert: the registry record and where its acceptance is in the log."""

    expert: registry_pb2.Expert
    log_index: int
    tree_size: int


class ConsortiumClient:
    """One member's session with the coordinator (a context manager closing the channel)."""

    def __init__(self, connection: Connection, timeout: float = 120.0) -> None:
        self.connection = connection
        self.timeout = timeout
        self.channel = secure_channel(
            connection.address, connection.ca, connection.cert, connection.key
        )
        self.registry = registry_pb2_grpc.RegistryServiceStub(self.channel)

    def __enter__(self) -> ConsortiumClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, what: str, method: object, request: object) -> object:
        try:
            return method(request, timeout=self.timeout)  # type: ignore[operator]
        except grpc.RpcError as err:
            raise CoordinatorError(what, err) from err

    # --- the anchor ---------------------------------------------------------------------

    def anchor_info(self) -> registry_pb2.Anchor:
        info = self._call("GetAnchor", self.registry.GetAnchor, registry_pb2.GetAnchorRequest())
        assert isinstance(info, registry_pb2.Anchor)
        return info

    def fetch_anchor(self, out: Path, progress: bool = True) -> Anchor:
        """Download the published anchor into ``out`` (kept if it is already that anchor)."""
        from flexfed.common.api.transfer import download_artifact

        info = self.anchor_info()
        if out.exists():
            try:
                existing = open_anchor(out)
            except FlexfedError:
                existing = None
            if existing is not None and existing.digest == info.digest:
                log.info("%s already holds anchor %s", out, info.digest)
                return existing
            raise ConfigError(f"{out} exists and is not the published anchor; choose another --out")
        download_artifact(self.channel, info.artifact_digest, out, progress=progress)
        anchor = open_anchor(out)
        if anchor.digest != info.digest:
            shutil.rmtree(out, ignore_errors=True)
            raise VerificationError(
                f"the downloaded anchor's digest {anchor.digest} is not the published "
                f"{info.digest}; nothing kept"
            )
        return anchor

    # --- experts --------------------------------------------------------------------------

    def submit(self, expert_dir: Path, progress: bool = True) -> Submission:
        """Upload a signed expert bundle and submit it; raise if refused.

        The coordinator answers an acceptance with an inclusion proof of its log entry in a
        signed checkpoint; the proof is checked here against the checkpoint's root, so an
        acceptance that is not in the log is caught at once.
        """
        from flexfed.common.api.transfer import upload_artifact

        info = upload_artifact(
            self.channel, expert_dir, artifact_pb2.ARTIFACT_KIND_EXPERT_BUNDLE, progress=progress
        )
        request = registry_pb2.SubmitExpertRequest(artifact_digest=info.digest)
        answer = self._call("SubmitExpert", self.registry.SubmitExpert, request)
        assert isinstance(answer, registry_pb2.SubmitExpertResponse)
        if not answer.accepted:
            raise SubmissionRefusedError(answer.reason_code or "refused", answer.reason)
        checkpoint = verify_checkpoint(
            SignedCheckpoint.from_text(answer.checkpoint.text), self._log_key()
        )
        entry = self._log_entry(answer.expert.log_index)
        verify_inclusion(
            leaf_hash(entry),
            answer.inclusion.leaf_index,
            answer.inclusion.tree_size,
            list(answer.inclusion.hashes),
            checkpoint.root_hash,
        )
        return Submission(answer.expert, answer.expert.log_index, answer.inclusion.tree_size)

    def _log_key(self) -> ec.EllipticCurvePublicKey:
        """The log's public key as the coordinator serves it (auditors pin theirs instead)."""
        stub = audit_pb2_grpc.AuditServiceStub(self.channel)
        answer = self._call("GetLogKey", stub.GetLogKey, audit_pb2.GetLogKeyRequest())
        assert isinstance(answer, audit_pb2.LogKey)
        return load_public_key(answer.public_key_pem)

    def _log_entry(self, index: int) -> bytes:
        stub = audit_pb2_grpc.AuditServiceStub(self.channel)
        page = self._call(
            "GetEntries", stub.GetEntries, audit_pb2.GetEntriesRequest(start=index, end=index + 1)
        )
        assert isinstance(page, audit_pb2.GetEntriesResponse)
        if page.start != index or len(page.entries) != 1:
            raise VerificationError(f"the coordinator did not serve log entry {index}")
        return bytes(page.entries[0])

    def experts(self, org: str = "") -> list[registry_pb2.Expert]:
        answer = self._call(
            "ListExperts", self.registry.ListExperts, registry_pb2.ListExpertsRequest(org=org)
        )
        assert isinstance(answer, registry_pb2.ListExpertsResponse)
        return list(answer.experts)

    def owner_request(
        self, action: str, expert_id: str, org: str
    ) -> registry_pb2.OwnerRequestResponse:
        """Opt an expert out (``action="opt-out"``) or back in, signed with our key."""
        from flexfed.common.trust.owner_request import sign_owner_request

        request = sign_owner_request(
            action, expert_id, org, self.connection.key, self.connection.cert
        )
        method = self.registry.OptOut if action == "opt-out" else self.registry.OptIn
        answer = self._call(action, method, request.to_proto())
        assert isinstance(answer, registry_pb2.OwnerRequestResponse)
        return answer

    # --- releases (the operator releases and revokes; everyone may read and download) -----

    def releases(self) -> list[registry_pb2.Release]:
        answer = self._call(
            "ListReleases", self.registry.ListReleases, registry_pb2.ListReleasesRequest()
        )
        assert isinstance(answer, registry_pb2.ListReleasesResponse)
        return list(answer.releases)

    def release(self, expert_ids: list[str] | None = None, top_k: int = 0) -> registry_pb2.Release:
        """Operator: assemble the accepted experts (or those named) into a new model version."""
        request = registry_pb2.ReleaseRequest(expert_ids=expert_ids or [], top_k=top_k)
        answer = self._call("ReleaseModel", self.registry.ReleaseModel, request)
        assert isinstance(answer, registry_pb2.Release)
        return answer

    def revoke(self, expert_id: str, reason: str) -> registry_pb2.OwnerRequestResponse:
        """Operator: withdraw an expert for good (logged; later releases leave it out)."""
        request = registry_pb2.RevokeExpertRequest(expert_id=expert_id, reason=reason)
        answer = self._call("RevokeExpert", self.registry.RevokeExpert, request)
        assert isinstance(answer, registry_pb2.OwnerRequestResponse)
        return answer

    def fetch_model(self, out: Path, version: int = 0, progress: bool = True) -> Path:
        """Download released model ``version`` (0: the latest) into ``out``."""
        from flexfed.common.api.transfer import download_artifact

        releases = self.releases()
        if not releases:
            raise ConfigError("the coordinator has released no model yet")
        chosen = (
            max(releases, key=lambda r: r.version)
            if version == 0
            else next((r for r in releases if r.version == version), None)
        )
        if chosen is None:
            known = ", ".join(str(r.version) for r in releases)
            raise ConfigError(f"no release {version}; released versions: {known}")
        return download_artifact(self.channel, chosen.model_artifact_digest, out, progress=progress)
