"""Expert submission: from an uploaded bundle in the store to an ``expert-accepted`` log entry.

:meth:`SubmissionPipeline.submit` takes the digest of an uploaded ``EXPERT_BUNDLE`` and:

1. extracts it from the store into a fresh staging directory (safely: no links, no escaping
   paths, bounded size);
2. validates it against the consortium's anchor (:func:`~flexfed.common.formats.bundle.
   validate_bundle`, the one structural gate);
3. verifies it (:class:`~flexfed.common.trust.signing.BundleVerifier`: signature, chain to the CA,
   the CRL as it is now, owner role, expert.json's org = the signer's, the anchor digest,
   provenance), and requires the signer's org to be the caller's (an operator may submit for
   anyone);
4. appends ``expert-accepted`` to the log (durable), *then* commits the registry row. A
   crash between the two leaves an entry without a row, which
   :func:`flexfed.server.consistency.recover` re-inserts from the entry at startup, so the
   entry carries everything the row needs (``expert_id``, ``signer``).

A refusal changes nothing (no entry, no row) and is answered with a stable
:data:`REASON_CODES` code and the error's one-line message. Submitting an accepted bundle
again returns the existing acceptance. Submissions run one at a time.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from flexfed.common.errors import (
    AnchorMismatchError,
    BundleError,
    FlexfedError,
    InvalidInputError,
    MetadataError,
    NonFiniteTensorError,
    SafetensorsFormatError,
    TensorMismatchError,
    VerificationError,
)
from flexfed.common.formats.archive import ArtifactKind, extract_archive, parse_digest
from flexfed.common.formats.bundle import max_bundle_bytes, validate_bundle
from flexfed.common.moe.plausibility import (
    ImplausibleActivationsError,
    ImplausibleExpertError,
    ImplausibleRouterError,
    check_plausible,
)
from flexfed.common.trust.log_events import accepted_event
from flexfed.common.trust.pki import CertificateError, CertificateRevokedError, CrlError
from flexfed.common.trust.provenance import ProvenanceError
from flexfed.common.trust.signing import (
    AnchorDigestMismatchError,
    BundleVerifier,
    SignerOrgMismatchError,
    VerifiedBundle,
)
from flexfed.common.util.clock import utc_now_iso
from flexfed.server.coordinator import Coordinator
from flexfed.server.failpoints import failpoint
from flexfed.server.registry import ExpertRecord, ExpertState
from flexfed.server.store import UnknownArtifactError

logger = logging.getLogger(__name__)

# Most specific first: the first class an error is an instance of gives its code.
_CODES: Final[tuple[tuple[type[Exception], str], ...]] = (
    (ImplausibleActivationsError, ImplausibleActivationsError.code),
    (ImplausibleRouterError, ImplausibleRouterError.code),
    (ImplausibleExpertError, ImplausibleExpertError.code),
    (CertificateRevokedError, "certificate-revoked"),
    (CrlError, "crl-invalid"),
    (CertificateError, "certificate-untrusted"),
    (SignerOrgMismatchError, "org-mismatch"),
    (AnchorDigestMismatchError, "anchor-mismatch"),
    (AnchorMismatchError, "anchor-mismatch"),
    (ProvenanceError, "provenance-invalid"),
    (NonFiniteTensorError, "not-finite"),
    (TensorMismatchError, "shape-mismatch"),
    (SafetensorsFormatError, "safetensors-invalid"),
    (MetadataError, "metadata-invalid"),
    (VerificationError, "signature-invalid"),
    (BundleError, "bundle-invalid"),
    (InvalidInputError, "bundle-invalid"),
)
#: Every reason a submission can be refused for (stable: clients and scripts match on them).
REASON_CODES: Final = (
    *dict.fromkeys(code for _, code in _CODES),
    "not-uploaded",
    "duplicate-name",
    "expert-revoked",
    "weights-duplicate",
)


class CallerOrgError(FlexfedError, PermissionError):
    """An owner submitted (or asked about) another organisation's expert."""

    exit_code = 4


class Refusal(Exception):
    """A submission refused with a stable code (internal: :meth:`submit` returns it)."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def reason_code(err: Exception) -> str:
    """The stable refusal code of a validation or verification error."""
    return next((code for cls, code in _CODES if isinstance(err, cls)), "bundle-invalid")


@dataclass(frozen=True)
class Submission:
    """The outcome of one submission."""

    accepted: bool
    expert: ExpertRecord | None = None
    reason_code: str = ""
    reason: str = ""
    already: bool = False  # the bundle had been accepted before (nothing new was logged)


def acceptance_event(verified: VerifiedBundle, expert_id: str, time: str) -> dict[str, Any]:
    """The ``expert-accepted`` entry: audit's shape plus what the registry row needs."""
    record = {
        "org": verified.org,
        "name": verified.expert_name,
        "expert_sha256": verified.weights_sha256,
        "meta_sha256": verified.signed_files["expert.json"],
        "data_commitment": verified.data_commitment,
    }
    event = accepted_event(record, verified.anchor_digest, time)
    event.update(expert_id=expert_id, signer=str(verified.identity))
    return event


def record_of(event: dict[str, Any], log_index: int) -> ExpertRecord:
    """The registry row an ``expert-accepted`` entry stands for."""
    return ExpertRecord(
        expert_id=event["expert_id"],
        org=event["org"],
        name=event["name"],
        state=ExpertState.ACCEPTED,
        log_index=log_index,
        anchor_digest=event["anchor_digest"],
        data_commitment=event["data_commitment"],
        expert_sha256=event["expert_sha256"],
        meta_sha256=event["meta_sha256"],
        signer=event["signer"],
        submitted_at=event["time"],
    )


class SubmissionPipeline:
    """Validates, verifies and accepts uploaded expert bundles for one coordinator."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self._lock = threading.Lock()
        anchor = coordinator.anchor
        self.max_bundle_bytes = max_bundle_bytes(anchor)

    def submit(self, artifact_digest: str, caller_org: str | None) -> Submission:
        """Accept the uploaded bundle ``artifact_digest`` or say why not.

        ``caller_org``: the calling owner's org (``None`` for the operator). Raises
        :class:`CallerOrgError` when the bundle belongs to another org; every other refusal
        is a :class:`Submission` with ``accepted=False``.
        """
        with self._lock:
            try:
                return self._submit(artifact_digest, caller_org)
            except Refusal as refusal:
                logger.info("refused %s: %s (%s)", artifact_digest, refusal.code, refusal.reason)
                # No path of the coordinator's reaches the owner (whatever a check named).
                reason = refusal.reason.replace(str(self.coordinator.config.root), "<coordinator>")
                return Submission(False, reason_code=refusal.code, reason=reason)

    def _submit(self, digest: str, caller_org: str | None) -> Submission:
        c = self.coordinator
        try:
            parse_digest(digest)
        except InvalidInputError as err:
            raise Refusal("not-uploaded", str(err)) from err
        existing = c.registry.expert(digest)
        if existing is not None:
            if caller_org is not None and existing.org != caller_org:
                raise CallerOrgError(f"expert {digest} belongs to {existing.org!r}")
            if existing.state is ExpertState.REVOKED:
                raise Refusal("expert-revoked", f"expert {digest} was revoked by the operator")
            return Submission(True, existing, already=True)
        try:
            info = c.store.info(digest)
        except UnknownArtifactError as err:
            raise Refusal(
                "not-uploaded", f"{err}; upload the bundle first (flexfed client submit does)"
            ) from err
        if info.kind != ArtifactKind.EXPERT_BUNDLE:
            raise Refusal("bundle-invalid", f"artifact {digest} is an {info.kind.label}")
        if info.size > self.max_bundle_bytes:
            raise Refusal(
                "bundle-invalid",
                f"artifact {digest} is {info.size} bytes; a bundle for this anchor is at most "
                f"{self.max_bundle_bytes}",
            )
        work = c.staging("submit")
        try:
            verified = self._check(work, digest, caller_org)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self._accept(verified, digest)

    def _check(self, work: Path, digest: str, caller_org: str | None) -> VerifiedBundle:
        c = self.coordinator
        try:
            bundle = extract_archive(
                c.store.path(digest), work / "bundle", max_bytes=self.max_bundle_bytes
            )
            validated = validate_bundle(bundle, c.anchor)
            check_plausible(validated, c.anchor)  # values training from the anchor can give
            # NOTE: a fresh verifier per bundle (model-signing's OpenSSL store keeps the first
            # time it is given), the CRL as it is at this moment.
            verifier = BundleVerifier(
                c.ca_cert, c.current_crl(), expected_anchor_digest=c.config.anchor.digest
            )
            verified = verifier.verify(bundle)
        except (InvalidInputError, VerificationError) as err:
            # FIX (issue 12): the reason named the bundle's staging directory on the server.
            reason = str(err).replace(str(work / "bundle"), "the bundle")
            raise Refusal(reason_code(err), reason) from err
        if validated.weights_sha256 != verified.weights_sha256:  # pragma: no cover - same file
            raise Refusal("bundle-invalid", "the bundle changed while it was checked")
        if caller_org is not None and verified.org != caller_org:
            raise CallerOrgError(
                f"the bundle is {verified.org!r}'s expert; {caller_org!r} may submit only its own"
            )
        duplicate = [
            e
            for e in c.registry.experts(org=verified.org)
            if e.name == verified.expert_name
            and (e.state is not ExpertState.REVOKED or e.expert_sha256 == verified.weights_sha256)
        ]
        if duplicate:
            e = duplicate[0]
            if e.state is ExpertState.REVOKED:
                raise Refusal(
                    "expert-revoked", f"these weights were revoked as expert {e.expert_id}"
                )
            raise Refusal(
                "duplicate-name",
                f"{verified.org} already has an expert named {verified.expert_name!r} "
                f"({e.expert_id}, {e.state.value}); give the new one another name",
            )
        self._check_weights_unique(verified)
        return verified

    def _check_weights_unique(self, verified: VerifiedBundle) -> None:
        """One set of weights, one expert: FIX (issue 12) for a member that re-signed another
        member's expert under its own name (accepted; after the real owner opted out, the
        copy kept its weights in every release, and while both were accepted, releases
        failed with "given twice")."""
        for e in self.coordinator.registry.with_weights(verified.weights_sha256):
            if e.org != verified.org:
                raise Refusal(
                    "weights-duplicate",
                    "these weights were already submitted by another organisation; an "
                    "expert's weights are accepted once, from one organisation",
                )
            if e.state is ExpertState.REVOKED:
                raise Refusal(
                    "expert-revoked", f"these weights were revoked as expert {e.expert_id}"
                )
            if e.state is ExpertState.ACCEPTED:
                raise Refusal(
                    "weights-duplicate",
                    f"these weights are already accepted as {e.org}/{e.name} ({e.expert_id}); "
                    "opt that one out first to replace it",
                )

    def _accept(self, verified: VerifiedBundle, digest: str) -> Submission:
        c = self.coordinator
        event = acceptance_event(verified, digest, utc_now_iso())
        with c.lock:
            index = c.log.append(event)  # durable first: recovery rebuilds the row from it
            failpoint("submit-after-log")  # crash tests: logged, no registry row yet
            record = c.after_log(
                lambda: c.registry.add_expert(record_of(event, index)), f"acceptance of {digest}"
            )
        logger.info("accepted %s/%s as %s (log entry %d)", record.org, record.name, digest, index)
        return Submission(True, record)
