"""What an audit says: the reasons it can refuse for, its findings, per-slot results, the report.

:func:`flexfed.common.trust.audit.audit_model` fills an :class:`AuditReport`; the CLI prints it
(``flexfed audit verify``/``report``) and :class:`AuditFailedError` carries it when the audit fails.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from flexfed.common.errors import (
    VerificationError,
)

# --- reasons, findings, the report ---------------------------------------------------------


class Reason(StrEnum):
    """Why an audit failed: one code per kind of failure (docs/auditor-guide.md explains each)."""

    MODEL_UNREADABLE = "model-unreadable"
    RELEASE_UNSIGNED = "release-unsigned"
    RELEASE_SIGNATURE_INVALID = "release-signature-invalid"
    RELEASE_SIGNER_UNTRUSTED = "release-signer-untrusted"
    RELEASE_SIGNER_REVOKED = "release-signer-revoked"
    RELEASE_SIGNER_NOT_OPERATOR = "release-signer-not-operator"
    RELEASE_FILE_MODIFIED = "release-file-modified"
    RELEASE_FILE_MISSING = "release-file-missing"
    RELEASE_FILE_UNSIGNED = "release-file-unsigned"
    CRL_INVALID = "crl-invalid"
    ANCHOR_MISMATCH = "anchor-mismatch"
    PUBLIC_WEIGHTS_MISMATCH = "public-weights-mismatch"
    RELEASE_FILES_MISMATCH = "release-files-mismatch"
    LOG_NOT_RECORDED = "log-not-recorded"
    LOG_CHECKPOINT_INVALID = "log-checkpoint-invalid"
    LOG_FORK = "log-fork"
    RELEASE_NOT_IN_LOG = "release-not-in-log"
    DUPLICATE_EXPERT = "duplicate-expert"
    PROVENANCE_INCOMPLETE = "provenance-incomplete"
    REBUILD_FAILED = "rebuild-failed"
    WEIGHTS_MISMATCH = "weights-mismatch"
    EXPERT_JSON_MODIFIED = "expert-json-modified"
    BUNDLE_SIGNATURE_INVALID = "bundle-signature-invalid"
    OWNER_CERTIFICATE_INVALID = "owner-certificate-invalid"
    OWNER_REVOKED = "owner-revoked"
    SIGNER_ORG_MISMATCH = "signer-org-mismatch"
    EXPERT_ANCHOR_MISMATCH = "expert-anchor-mismatch"
    PROVENANCE_INVALID = "provenance-invalid"
    RECORD_MISMATCH = "record-mismatch"
    NOT_IN_LOG = "not-in-log"
    OPTED_OUT = "opted-out"
    REVOKED_IN_LOG = "revoked-in-log"


@dataclass(frozen=True)
class Finding:
    """One failed check: its reason code, a one-line explanation, the slot (None: the model)."""

    reason: Reason
    message: str
    slot: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"reason": str(self.reason), "message": self.message, "slot": self.slot}


@dataclass
class SlotResult:
    """What the audit found for one slot of assembly.json."""

    slot: int
    kind: str  # "public" or "expert"
    org: str | None
    name: str
    expert_sha256: str | None = None
    log_index: int | None = None
    signer: str | None = None  # the owner whose signature verified, as Identity prints it
    # From the signed expert.json: the DP guarantee its trainer recorded (None: trained without).
    privacy: dict[str, Any] | None = None
    checked: list[str] = field(default_factory=list)  # checks that passed, in order
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def fail(self, reason: Reason, message: str) -> None:
        self.findings.append(Finding(reason, message, self.slot))

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "kind": self.kind,
            "org": self.org,
            "name": self.name,
            "expert_sha256": self.expert_sha256,
            "log_index": self.log_index,
            "signer": self.signer,
            "privacy": self.privacy,
            "checked": list(self.checked),
            "ok": self.ok,
            "findings": [f.to_json() for f in self.findings],
        }


@dataclass
class AuditReport:
    """The outcome of :func:`audit_model`: per-slot results, model-level findings, verdict."""

    model: Path
    at: dt.datetime
    model_type: str | None = None
    anchor_digest: str | None = None
    model_digest: str | None = None  # content digest of every file but model.sig, assembly.json
    release_signer: str | None = None
    log: dict[str, Any] | None = None  # the verified checkpoint, and the log file's size
    slots: list[SlotResult] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # about the model as a whole
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)  # what the inputs did not allow

    def fail(self, reason: Reason, message: str) -> None:
        self.findings.append(Finding(reason, message))

    @property
    def all_findings(self) -> list[Finding]:
        return [*self.findings, *(f for s in self.slots for f in s.findings)]

    @property
    def ok(self) -> bool:
        return not self.all_findings

    @property
    def reasons(self) -> list[str]:
        """The distinct reason codes of every finding, sorted."""
        return sorted({str(f.reason) for f in self.all_findings})

    def summary(self) -> str:
        """One line: the verdict and, on failure, every reason with where it occurred."""
        experts = [s for s in self.slots if s.kind == "expert"]
        if self.ok:
            return (
                f"audit of {self.model} passed: release signature and {len(experts)} expert(s) "
                f"verified{' against the log' if self.log else ''}"
            )
        where = [
            f"{f.reason}" + (f" (slot {f.slot})" if f.slot is not None else "")
            for f in self.all_findings
        ]
        n = len(where)
        return f"audit of {self.model} failed, {n} problem(s): {', '.join(where)}"

    def raise_for_failure(self) -> None:
        """Raise :class:`AuditFailedError` (exit code 4) unless the audit passed."""
        if not self.ok:
            raise AuditFailedError(self.summary(), self)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": str(self.model),
            "ok": self.ok,
            "at": self.at.isoformat(),
            "model_type": self.model_type,
            "anchor_digest": self.anchor_digest,
            "model_digest": self.model_digest,
            "release_signer": self.release_signer,
            "log": self.log,
            "checked": list(self.checked),
            "not_checked": list(self.not_checked),
            "reasons": self.reasons,
            "findings": [f.to_json() for f in self.findings],
            "slots": [s.to_json() for s in self.slots],
        }


# --- errors --------------------------------------------------------------------------------


class AuditFailedError(VerificationError):
    """An audited model failed at least one check; ``report`` says which and why."""

    def __init__(self, message: str, report: AuditReport) -> None:
        super().__init__(message)
        self.report = report
