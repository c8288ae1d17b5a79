"""Releasing and auditing assembled models: every expert checked without trusting the coordinator.

The operator releases an assembled model in two steps, after :func:`~flexfed.common.assembly.
assemble` (or :func:`~flexfed.common.optout.optout`):

1. :func:`record_release` logs it in the transparency log: an ``expert-accepted`` entry per
   expert not yet logged, an ``opt-out`` entry per removed expert not yet withdrawn, then one
   ``assembly-released`` entry (the model's content digest and its slots). It writes each
   slot's ``log_index``, ``release_log_index`` and a signed log checkpoint into assembly.json.
2. :func:`sign_release` signs the whole directory with the operator's certificate: a
   ``model.sig`` at the root, an OpenSSF model-signing bundle, per-file SHA-256 over every
   file but itself (assembly.json and provenance/ included).

:func:`audit_model` is the auditor's side. It needs the consortium CA certificate and,
optionally, the CRL, the log file with the log's public key, and the anchor. It checks:

- the root ``model.sig``: a valid OMS signature by an operator certificate of the CA (chain,
  role, revocation at ``at``), covering exactly the files present, each unchanged;
- each expert slot: the signed expert is rebuilt from the checkpoint (the slot's FFN tensors
  and router row) plus what :mod:`~flexfed.common.assembly` keeps under
  ``provenance/<org>--<name>/`` (the router biases and the original safetensors header), and
  the rebuilt bundle goes through :class:`~flexfed.common.signing.BundleVerifier`: owner
  signature, chain, revocation, org binding, the anchor of assembly.json, provenance, and the
  rebuilt weights' SHA-256 against the signed one (so an expert moved to another slot, or
  edited, fails); assembly.json's record of the slot must match what was verified;
- with a log: the signed checkpoint in assembly.json (log key), that the log file extends it
  (consistency: no fork), inclusion of each slot's ``expert-accepted`` entry and of the
  ``assembly-released`` entry (which must name this model's digest and slots), and that no
  expert in the model was opted out or revoked in the log after its acceptance;
- with the anchor: its digest is assembly.json's, and the shared tensors, slot 0's FFN and
  router row are the anchor's, byte for byte.

Every failure is a :class:`Finding` with its own :class:`Reason` code; the audit goes on past
failures so one run lists them all. :attr:`AuditReport.ok` is the verdict.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.anchor import Anchor
from flexfed.common.assembly import (
    ASSEMBLY_FILE,
    PROVENANCE_DIR,
    ROUTER_BIAS_FILE,
    WEIGHTS_HEADER_FILE,
    RebuildError,
    rebuild_expert_weights,
    slot_dir_name,
)
from flexfed.common.bundle import EXPERT_META, EXPERT_WEIGHTS, PROVENANCE, SIGNATURE
from flexfed.common.checkpoint import write_json
from flexfed.common.digest import manifest_digest, sha256_file
from flexfed.common.errors import (
    ConfigError,
    FlexfedError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.families import PROJECTIONS
from flexfed.common.optout import AssembledModel
from flexfed.common.pki import (
    CertificateError,
    CertificateRevokedError,
    CertificateRoleError,
    CrlError,
    Identity,
    PathLike,
    identity_of,
    load_certificate,
    load_crl,
    verify_chain,
)
from flexfed.common.provenance import ProvenanceError
from flexfed.common.safetensors_io import DTYPE_SIZES, TensorInfo
from flexfed.common.signing import (
    AnchorDigestMismatchError,
    BundleVerifier,
    SignerOrgMismatchError,
    TamperedMetadataError,
    TamperedWeightsError,
    load_private_key,
)
from flexfed.common.translog import (
    CheckpointFormatError,
    CheckpointSignatureError,
    ConsistencyProofError,
    FileLog,
    InclusionProofError,
    SignedCheckpoint,
    entry_bytes,
    leaf_hash,
    load_public_key,
    parse_entry,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)

logger = logging.getLogger(__name__)

RELEASE_SIGNATURE = "model.sig"
MAX_RELEASE_SIGNATURE_BYTES = 16 * 1024 * 1024  # one manifest line per file: KiBs in practice
_REBUILD_FILES = frozenset(
    {EXPERT_META, SIGNATURE, PROVENANCE, ROUTER_BIAS_FILE, WEIGHTS_HEADER_FILE}
)
_CHUNK = 8 * 1024 * 1024


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


class ReleaseError(InvalidInputError):
    """A model cannot be recorded or signed as asked (a usage error, not tampering)."""


class ReleaseSignerError(ReleaseError):
    """The key or certificate given cannot sign releases (not an operator's, expired...)."""


class ReleaseStateError(ReleaseError):
    """The model is already recorded in a log, or already signed, so it cannot be recorded."""


# --- files of a model ----------------------------------------------------------------------


def model_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Every plain file under ``root`` but the root model.sig, by relative POSIX path, sorted.

    Also returns the relative paths of entries that are neither plain files nor folders
    (links, devices): no signature can vouch for them.
    """
    if not root.is_dir():
        raise MissingFileError(f"model directory not found: {root}")
    files: dict[str, Path] = {}
    odd: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = base / name
            rel = path.relative_to(root).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                odd.append(rel)
            elif rel != RELEASE_SIGNATURE:
                files[rel] = path
    return dict(sorted(files.items())), sorted(odd)


def content_digest(manifest: Mapping[str, str]) -> str:
    """The digest the ``assembly-released`` log entry names: every file but assembly.json.

    assembly.json is left out because it records the log entry's own index; the root
    ``model.sig`` covers it.
    """
    return manifest_digest({k: v for k, v in manifest.items() if k != ASSEMBLY_FILE})


# --- log events ----------------------------------------------------------------------------


class LogReader(Protocol):
    """What the audit reads from a log (:class:`~flexfed.common.translog.FileLog` has it)."""

    @property
    def size(self) -> int: ...
    def entry(self, index: int) -> bytes: ...
    def root(self, tree_size: int | None = None) -> bytes: ...
    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]: ...
    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]: ...


def _utc(when: dt.datetime) -> dt.datetime:
    """A naive datetime is taken as UTC."""
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


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
        "time": time or _now(),
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


# --- releasing -----------------------------------------------------------------------------


def _private_key(key: ec.EllipticCurvePrivateKey | PathLike) -> ec.EllipticCurvePrivateKey:
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else load_private_key(key)


def record_release(
    model_dir: PathLike,
    log: FileLog,
    log_key: ec.EllipticCurvePrivateKey | PathLike,
    origin: str,
    *,
    time: str | None = None,
) -> dict[str, Any]:
    """Log an assembled model's experts and its release; write the log data into assembly.json.

    Appends, to ``log``: ``expert-accepted`` for each expert slot with no such entry yet,
    ``opt-out`` for each removed expert (assembly.json ``removed``) accepted and not yet
    withdrawn, then ``assembly-released`` (anchor, content digest, slots). Then writes each
    slot's ``log_index``, ``release_log_index`` and ``log_checkpoint`` (the log's checkpoint
    now, signed with ``log_key`` for ``origin``, in signed-note text) into assembly.json.
    Call it before :func:`sign_release`. Refuses (:class:`ReleaseStateError`) a model that is
    already signed or recorded, and one holding an expert the log says was opted out or
    revoked. Returns the new assembly record.
    """
    root = Path(model_dir)
    if (root / RELEASE_SIGNATURE).exists():
        raise ReleaseStateError(
            f"{root} is already signed ({RELEASE_SIGNATURE}); record a release before signing "
            "it (remove model.sig to record and sign again)"
        )
    model = AssembledModel(root)
    assembly = model.assembly
    if assembly.get("release_log_index") is not None:
        raise ReleaseStateError(
            f"{root} was already recorded (log entry {assembly['release_log_index']}); "
            "release a new assembly instead"
        )
    key = _private_key(log_key)
    when = time or _now()
    anchor_digest = str(assembly["anchor_digest"])
    events = _read_events(log)

    def acceptance(record: Mapping[str, Any]) -> int | None:
        """The entry that accepted this expert: the one recorded if valid, else the latest."""
        matches = [i for i, e in enumerate(events) if _is_acceptance(e, record)]
        index = record.get("log_index")
        return index if index in matches else (matches[-1] if matches else None)

    def append(event: dict[str, Any]) -> int:
        events.append(parse_entry(entry_bytes(event)))
        return log.append(event)

    experts = [slot for slot in model.slots if slot.get("kind") == "expert"]
    accepted = [acceptance(slot) for slot in experts]
    for slot, index in zip(experts, accepted, strict=True):  # refuse before appending anything
        withdrawn = _withdrawal(events, slot, index) if index is not None else None
        if withdrawn is not None:
            # NOTE: logging a fresh acceptance would quietly re-admit a withdrawn expert.
            raise ReleaseStateError(
                f"expert {slot['org']}/{slot['name']} is withdrawn ({withdrawn[0]} at log entry "
                f"{withdrawn[1]}); remove it with `flexfed optout` before releasing"
            )
    for slot, index in zip(experts, accepted, strict=True):
        slot["log_index"] = (
            index if index is not None else append(accepted_event(slot, anchor_digest, when))
        )
    for record in assembly.get("removed", []):
        index = acceptance(record) if record.get("org") else None
        if index is not None and _withdrawal(events, record, index) is None:
            append(opt_out_event(record["org"], record["name"], record["expert_sha256"], when))

    files, _ = model_files(root)
    release = {
        "type": "assembly-released",
        "anchor_digest": anchor_digest,
        "model_digest": content_digest({rel: sha256_file(p) for rel, p in files.items()}),
        "slots": release_slots(assembly),
        "time": when,
    }
    assembly["release_log_index"] = append(release)
    assembly["log_checkpoint"] = log.checkpoint(origin, key).to_text()
    tmp = root / f".{ASSEMBLY_FILE}.tmp-{os.getpid()}"
    write_json(tmp, assembly)
    os.replace(tmp, root / ASSEMBLY_FILE)
    logger.info("recorded %s in %s at entry %d", root, log.path, assembly["release_log_index"])
    return assembly


@dataclass(frozen=True)
class SignedRelease:
    """What :func:`sign_release` wrote."""

    path: Path
    signature: Path
    identity: Identity
    files: int  # how many files the signature covers
    manifest_digest: str  # the OMS root digest of the signed files


def sign_release(
    model_dir: PathLike,
    key: PathLike,
    cert: PathLike,
    chain: Iterable[PathLike] = (),
    *,
    at: dt.datetime | None = None,
) -> SignedRelease:
    """Sign an assembled model directory as the coordinator: ``model.sig`` at its root.

    An OpenSSF model-signing bundle made with the operator's certificate (``chain``: PEM
    files shipped after it, usually ``ca.pem``), per-file SHA-256 over every file in the
    directory except ``model.sig`` itself. Replaces an earlier ``model.sig``. Refuses a key
    that is not the certificate's, a certificate that is not an operator's or not valid at
    ``at`` (default now), and a directory holding links.
    """
    import model_signing.hashing
    import model_signing.signing

    root = Path(model_dir)
    when = _utc(at) if at is not None else dt.datetime.now(dt.UTC)
    private = load_private_key(key)
    certificate = load_certificate(cert)
    if private.public_key() != certificate.public_key():
        raise ReleaseSignerError(f"{key} is not the private key of {cert}")
    identity = identity_of(certificate)
    if identity.role != "operator":
        raise ReleaseSignerError(
            f"{cert} is an {identity.role} certificate; releases are signed by the consortium "
            "operator (role operator)"
        )
    if not certificate.not_valid_before_utc <= when <= certificate.not_valid_after_utc:
        raise ReleaseSignerError(
            f"{cert} is not valid at {when:%Y-%m-%d %H:%M} UTC; ask the CA for a new certificate"
        )
    chain_paths = [Path(p) for p in chain]
    for path in chain_paths:
        try:
            issuers = x509.load_pem_x509_certificates(path.read_bytes())
        except FileNotFoundError:
            raise MissingFileError(f"certificate chain file not found: {path}") from None
        except ValueError as err:
            raise ReleaseSignerError(f"{path} is not a PEM certificate file: {err}") from err
        for issuer in issuers:
            if issuer.subject == certificate.issuer:  # check it as auditors will
                identity = verify_chain(certificate, issuer, when, roles=("operator",))
    files, odd = model_files(root)
    if odd:
        raise ReleaseError(f"{root} holds {', '.join(odd)}, which is not a plain file")
    if ASSEMBLY_FILE not in files:
        raise MissingFileError(f"{root} has no {ASSEMBLY_FILE}: it is not an assembled model")
    hashing = (
        model_signing.hashing.Config()  # type: ignore[no-untyped-call]
        .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
        .set_ignored_paths(paths=[RELEASE_SIGNATURE], ignore_git_paths=False)
    )
    config = (
        model_signing.signing.Config()  # type: ignore[no-untyped-call]
        .use_certificate_signer(
            private_key=Path(key), signing_certificate=Path(cert), certificate_chain=chain_paths
        )
        .set_hashing_config(hashing)
    )
    out = root / RELEASE_SIGNATURE
    # NOTE: staged beside the model: a temporary file inside it would be signed too.
    with tempfile.TemporaryDirectory(dir=root.resolve().parent, prefix=".sign-") as tmp:
        staged = Path(tmp) / RELEASE_SIGNATURE
        config.sign(root, staged)
        os.replace(staged, out)
    digests = {rel: sha256_file(p) for rel, p in files.items()}
    logger.info("signed release %s as %s", root, identity)
    return SignedRelease(root, out, identity, len(files), manifest_digest(digests))


# --- auditing ------------------------------------------------------------------------------


_BUNDLE_REASONS: tuple[tuple[type[Exception], Reason], ...] = (
    (TamperedWeightsError, Reason.WEIGHTS_MISMATCH),
    (TamperedMetadataError, Reason.EXPERT_JSON_MODIFIED),
    (CertificateRevokedError, Reason.OWNER_REVOKED),
    (CrlError, Reason.CRL_INVALID),
    (CertificateError, Reason.OWNER_CERTIFICATE_INVALID),
    (SignerOrgMismatchError, Reason.SIGNER_ORG_MISMATCH),
    (AnchorDigestMismatchError, Reason.EXPERT_ANCHOR_MISMATCH),
    (ProvenanceError, Reason.PROVENANCE_INVALID),
)


def _bundle_reason(err: Exception) -> Reason:
    return next(
        (reason for cls, reason in _BUNDLE_REASONS if isinstance(err, cls)),
        Reason.BUNDLE_SIGNATURE_INVALID,
    )


def public_key_of(key: ec.EllipticCurvePublicKey | PathLike) -> ec.EllipticCurvePublicKey:
    """A log key from a PEM public key or certificate file (or as is)."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    path = Path(key)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFileError(f"log public key not found: {path}") from None
    if b"-----BEGIN CERTIFICATE" in data:
        try:
            public = x509.load_pem_x509_certificate(data).public_key()
        except ValueError as err:
            raise InvalidInputError(f"{path} is not a readable certificate: {err}") from err
        data = public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return load_public_key(data)


@contextmanager
def _opened_log(log: LogReader | PathLike) -> Iterator[LogReader]:
    """A log to read: a FileLog as is, a file through a private copy (never touched)."""
    if not isinstance(log, str | os.PathLike):  # a FileLog, or a remote_log.VerifiedLog
        yield log
        return
    path = Path(log)
    if "://" in str(log):
        raise ConfigError(
            f"{log}: open a coordinator's log with flexfed.common.remote_log.open_remote_log "
            "(flexfed audit verify --log grpcs://... does)"
        )
    if not path.is_file():
        raise MissingFileError(f"log file not found: {path}")
    # NOTE: FileLog takes the writer's lock and may cut a torn tail; an auditor's copy keeps
    # both away from the operator's file (and from a read-only fixture).
    with tempfile.TemporaryDirectory(prefix="flexfed-log-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        with FileLog(copy) as opened:
            yield opened


def audit_model(
    model_dir: PathLike,
    ca_cert: x509.Certificate | PathLike,
    crl: x509.CertificateRevocationList | PathLike | None = None,
    log: LogReader | PathLike | None = None,
    log_key: ec.EllipticCurvePublicKey | PathLike | None = None,
    at: dt.datetime | None = None,
    *,
    anchor: Anchor | None = None,
    log_origin: str | None = None,
    workdir: PathLike | None = None,
) -> AuditReport:
    """Audit a released model; return the report (``report.ok`` is the verdict).

    ``ca_cert`` is the consortium CA (the trust anchor), ``crl`` its revocation list,
    ``log`` the transparency log (a :class:`FileLog` or its file; a file is read through a
    private copy) with ``log_key`` its public key (PEM public key or certificate), ``at``
    the time at which certificates are judged (default now). ``anchor`` adds the shared-tensor
    check. ``workdir`` is where each expert is rebuilt, one at a time (default: the system's
    temporary directory; it needs room for one expert). Raises only for unusable inputs
    (a missing file, ``log`` without ``log_key``); everything about the model is a finding.
    """
    if log is not None and log_key is None:
        raise ConfigError("--log needs --log-key: the log's public key verifies its checkpoint")
    root = Path(model_dir)
    when = _utc(at) if at is not None else dt.datetime.now(dt.UTC)
    ca = ca_cert if isinstance(ca_cert, x509.Certificate) else load_certificate(ca_cert)
    revocations = (
        crl if crl is None or isinstance(crl, x509.CertificateRevocationList) else load_crl(crl)
    )
    public_log_key = public_key_of(log_key) if log_key is not None else None
    report = AuditReport(model=root, at=when)
    if revocations is None:
        report.not_checked.append("revocation (no CRL given)")

    files, odd = model_files(root)
    digests = {rel: sha256_file(path) for rel, path in files.items()}
    report.model_digest = content_digest(digests)
    for rel in odd:
        report.fail(Reason.RELEASE_FILE_UNSIGNED, f"{rel} is a link or special file")
    verifier = BundleVerifier(ca, revocations, at=when)
    _check_release_signature(report, root, digests, verifier, ca, revocations, when)

    try:
        model = AssembledModel(root)
        _check_slots_shape(model)
    except FlexfedError as err:
        report.fail(Reason.MODEL_UNREADABLE, str(err))
        return report
    report.model_type = model.checkpoint.model_type
    report.anchor_digest = str(model.assembly.get("anchor_digest"))
    for i, record in enumerate(model.slots):
        report.slots.append(
            SlotResult(
                slot=i,
                kind=str(record.get("kind")),
                org=record.get("org"),
                name=str(record.get("name")),
                expert_sha256=record.get("expert_sha256"),
                log_index=record.get("log_index"),
            )
        )
    if anchor is not None:
        _check_anchor(report, model, anchor)
    else:
        report.not_checked.append("shared tensors and slot 0 against the anchor (no anchor)")

    seen: dict[str, int] = {}
    for result in report.slots[1:]:
        key = f"{result.org}--{result.name}"
        for ident in (key, result.expert_sha256 or key):
            if ident in seen:
                result.fail(
                    Reason.DUPLICATE_EXPERT,
                    f"slot {result.slot} holds the same expert as slot {seen[ident]}",
                )
                break
            seen[ident] = result.slot
        # NOTE: one BundleVerifier per bundle: model-signing's verifier sets its X509 store's
        # time to each leaf's notBefore, but OpenSSL keeps the first time ever set on a store,
        # so a reused verifier rejects owner certificates issued later than the first one.
        verifier = BundleVerifier(
            ca, revocations, expected_anchor_digest=report.anchor_digest, at=when
        )
        _check_expert_slot(result, model, verifier, workdir)

    if log is None and public_log_key is None:
        report.not_checked.append("transparency log (no log given)")
    else:
        assert public_log_key is not None
        _check_log(report, model, log, public_log_key, log_origin)
    return report


def _check_slots_shape(model: AssembledModel) -> None:
    for i, record in enumerate(model.slots):
        want = "public" if i == 0 else "expert"
        if not isinstance(record, dict) or record.get("kind") != want or record.get("slot") != i:
            raise InvalidInputError(f"{ASSEMBLY_FILE}: slot {i} must be a {want} slot record")
        if want == "expert" and not all(
            isinstance(record.get(k), str) for k in ("org", "name", "expert_sha256")
        ):
            raise InvalidInputError(f"{ASSEMBLY_FILE}: slot {i} lacks org, name or expert_sha256")


def _check_release_signature(
    report: AuditReport,
    root: Path,
    digests: Mapping[str, str],
    verifier: BundleVerifier,
    ca: x509.Certificate,
    crl: x509.CertificateRevocationList | None,
    at: dt.datetime,
) -> None:
    path = root / RELEASE_SIGNATURE
    if not path.is_file():
        report.fail(
            Reason.RELEASE_UNSIGNED,
            f"no {RELEASE_SIGNATURE} at the model's root: the coordinator never signed it",
        )
        return
    # NOTE: the same model-signing calls BundleVerifier makes for a bundle (read, then verify
    # the OMS signature against our CA only); the manifest is then compared with every file.
    size = path.stat().st_size
    try:
        if size > MAX_RELEASE_SIGNATURE_BYTES:
            raise VerificationError(f"{RELEASE_SIGNATURE} is {size} bytes, too large")
        signature, leaf = verifier._read_signature(path, 0)  # (size checked above)
    except VerificationError as err:
        report.fail(Reason.RELEASE_SIGNATURE_INVALID, str(err))
        return
    try:
        identity = verify_chain(leaf, ca, at, crl, roles=("operator",))
        report.release_signer = str(identity)
    except CertificateRoleError as err:
        report.fail(Reason.RELEASE_SIGNER_NOT_OPERATOR, str(err))
    except CertificateRevokedError as err:
        report.fail(Reason.RELEASE_SIGNER_REVOKED, str(err))
    except CrlError as err:
        report.fail(Reason.CRL_INVALID, str(err))
    except CertificateError as err:
        report.fail(Reason.RELEASE_SIGNER_UNTRUSTED, str(err))
    try:
        manifest = verifier._verify_oms(signature)
    except VerificationError as err:
        report.fail(Reason.RELEASE_SIGNATURE_INVALID, str(err))
        return
    params = manifest.serialization_type
    if params.get("method") != "files" or params.get("hash_type") != "sha256":
        report.fail(
            Reason.RELEASE_SIGNATURE_INVALID,
            f"{RELEASE_SIGNATURE} uses serialization {params.get('method')!r}/"
            f"{params.get('hash_type')!r}; releases are signed per file with sha256",
        )
        return
    signed = {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}
    for rel in sorted(set(signed) - set(digests)):
        report.fail(Reason.RELEASE_FILE_MISSING, f"{rel} is signed but missing")
    for rel in sorted(set(digests) - set(signed)):
        report.fail(Reason.RELEASE_FILE_UNSIGNED, f"{rel} is not covered by {RELEASE_SIGNATURE}")
    for rel in sorted(set(signed) & set(digests)):
        if signed[rel] != digests[rel]:
            report.fail(
                Reason.RELEASE_FILE_MODIFIED,
                f"{rel} changed after the release was signed (SHA-256 {digests[rel][:16]}..., "
                f"signed {signed[rel][:16]}...)",
            )
    report.checked.append("release signature")


def _range_digest(path: Path, start: int, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while length:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                break
            h.update(chunk)
            length -= len(chunk)
    return h.hexdigest()


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    return (a.dtype, a.shape) == (b.dtype, b.shape) and _range_digest(
        a.path, a.start, a.nbytes
    ) == _range_digest(b.path, b.start, b.nbytes)


def _check_anchor(report: AuditReport, model: AssembledModel, anchor: Anchor) -> None:
    if anchor.digest != report.anchor_digest:
        report.fail(
            Reason.ANCHOR_MISMATCH,
            f"{ASSEMBLY_FILE} names anchor {str(report.anchor_digest)[:16]}..., the given anchor "
            f"is {anchor.digest[:16]}...",
        )
        return
    family, ckpt = model.family, model.checkpoint
    shared = model.shared_tensors()
    public = {n: i for n, i in anchor.checkpoint.tensors.items() if not family.is_dense_ffn_key(n)}
    differ = sorted(set(shared) ^ set(public))
    differ += [
        n for n in sorted(set(shared) & set(public)) if not _same_bytes(shared[n], public[n])
    ]
    hidden = anchor.shapes.hidden_size
    for layer in range(anchor.shapes.num_layers):
        for proj in PROJECTIONS:
            key = family.moe_expert_key(layer, 0, proj)
            if key not in ckpt.tensors or not _same_bytes(
                ckpt.tensors[key], anchor.checkpoint.info(family.dense_ffn_key(layer, proj))
            ):
                differ.append(key)
        router = ckpt.tensors.get(family.moe_router_key(layer))
        r_pub = anchor.r_pub_info(layer)
        row = hidden * DTYPE_SIZES[r_pub.dtype]
        if router is None or _range_digest(router.path, router.start, row) != _range_digest(
            r_pub.path, r_pub.start, r_pub.nbytes
        ):
            differ.append(f"{family.moe_router_key(layer)}[0]")
    if differ:
        report.fail(
            Reason.PUBLIC_WEIGHTS_MISMATCH,
            f"{len(differ)} shared or public-slot tensor(s) differ from the anchor's, e.g. "
            f"{', '.join(differ[:3])}",
        )
        return
    report.checked.append("anchor")


def _check_expert_slot(
    result: SlotResult,
    model: AssembledModel,
    verifier: BundleVerifier,
    workdir: PathLike | None,
) -> None:
    record = model.slots[result.slot]
    prov = model.path / PROVENANCE_DIR / slot_dir_name(record)
    present = {p.name for p in prov.iterdir()} if prov.is_dir() else set()
    missing, extra = sorted(_REBUILD_FILES - present), sorted(present - _REBUILD_FILES)
    if missing or extra:
        result.fail(
            Reason.PROVENANCE_INCOMPLETE,
            f"{PROVENANCE_DIR}/{prov.name}/ "
            + (f"lacks {', '.join(missing)}" if missing else f"has unexpected {', '.join(extra)}"),
        )
        if missing:
            return
    with tempfile.TemporaryDirectory(dir=workdir, prefix="flexfed-audit-") as tmp:
        bundle = Path(tmp) / prov.name
        bundle.mkdir()
        for name in (EXPERT_META, SIGNATURE, PROVENANCE):
            shutil.copyfile(prov / name, bundle / name)
        try:
            rebuild_expert_weights(
                model.checkpoint, model.family, result.slot, prov, bundle / EXPERT_WEIGHTS
            )
        except RebuildError as err:
            result.fail(Reason.REBUILD_FAILED, str(err))
            return
        try:
            verified = verifier.verify(bundle)
        except FlexfedError as err:
            result.fail(_bundle_reason(err), str(err))
            return
    result.signer = str(verified.identity)
    result.checked += ["owner signature", "weights"]
    signed = {
        "org": verified.org,
        "name": verified.expert_name,
        "expert_sha256": verified.weights_sha256,
        "meta_sha256": verified.signed_files[EXPERT_META],
        "data_commitment": verified.data_commitment,
    }
    wrong = [k for k, v in signed.items() if record.get(k) != v]
    if wrong:
        result.fail(
            Reason.RECORD_MISMATCH,
            f"{ASSEMBLY_FILE} slot {result.slot} says {', '.join(wrong)} differ from the signed "
            f"expert's ({verified.org}/{verified.expert_name})",
        )


def _check_log(
    report: AuditReport,
    model: AssembledModel,
    log: LogReader | PathLike | None,
    key: ec.EllipticCurvePublicKey,
    origin: str | None,
) -> None:
    assembly = model.assembly
    text = assembly.get("log_checkpoint")
    if not isinstance(text, str) or not text:
        report.fail(
            Reason.LOG_NOT_RECORDED,
            f"{ASSEMBLY_FILE} has no log checkpoint: the release was never recorded in a log",
        )
        return
    try:
        checkpoint = verify_checkpoint(SignedCheckpoint.from_text(text), key, origin=origin)
    except (CheckpointFormatError, CheckpointSignatureError) as err:
        report.fail(Reason.LOG_CHECKPOINT_INVALID, f"the log checkpoint in {ASSEMBLY_FILE}: {err}")
        return
    size, root_hash = checkpoint.tree_size, checkpoint.root_hash
    report.log = {"origin": checkpoint.origin, "tree_size": size, "root": root_hash.hex()}
    report.checked.append("log checkpoint")
    if log is None:
        report.not_checked.append("log entries and inclusion (no log file given)")
        return
    with _opened_log(log) as reader:
        report.log["log_size"] = reader.size
        try:
            if reader.size < size:
                raise ConsistencyProofError(
                    f"the log has {reader.size} entries, fewer than the {size} its checkpoint "
                    "commits to: it lost history"
                )
            proof = reader.consistency_proof(size, reader.size)
            verify_consistency(size, reader.size, root_hash, reader.root(), proof)
        except ConsistencyProofError as err:
            report.fail(Reason.LOG_FORK, f"the log does not extend the release's checkpoint: {err}")
            return
        events = _read_events(reader)

        def included(index: Any, what: str) -> str | None:
            """Why entry ``index`` is not proven in the checkpoint, or None."""
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
                return f"{what} has no log entry within the checkpoint (log_index {index!r})"
            try:
                proof = reader.inclusion_proof(index, size)
                verify_inclusion(leaf_hash(reader.entry(index)), index, size, proof, root_hash)
            except InclusionProofError as err:
                return f"{what}: {err}"
            return None

        release_index: Any = assembly.get("release_log_index")
        problem = included(release_index, "the release")
        if problem is None:
            event = events[release_index]
            expected = {
                "type": "assembly-released",
                "anchor_digest": report.anchor_digest,
                "model_digest": report.model_digest,
                "slots": release_slots(assembly),
            }
            wrong = [k for k, v in expected.items() if event.get(k) != v]
            if wrong:
                problem = f"log entry {release_index} is not this release ({', '.join(wrong)})"
        if problem:
            report.fail(Reason.RELEASE_NOT_IN_LOG, problem)
        for result in report.slots[1:]:
            record = model.slots[result.slot]
            what = f"expert {result.org}/{result.name}"
            problem = included(record.get("log_index"), what)
            if problem is None:
                event = events[record["log_index"]]
                if not _is_acceptance(event, record) or event.get("anchor_digest") != (
                    report.anchor_digest
                ):
                    problem = f"log entry {record['log_index']} is not the acceptance of {what}"
            if problem:
                result.fail(Reason.NOT_IN_LOG, problem)
                continue
            withdrawn = _withdrawal(events, record, record["log_index"])
            if withdrawn is None:
                result.checked.append("log")
            elif withdrawn[0] == "revocation":
                result.fail(
                    Reason.REVOKED_IN_LOG, f"{what} was revoked at log entry {withdrawn[1]}"
                )
            else:
                result.fail(
                    Reason.OPTED_OUT,
                    f"{what} was opted out at log entry {withdrawn[1]} but is still in the model",
                )
    report.checked.append("log")


__all__ = [
    "RELEASE_SIGNATURE",
    "AuditFailedError",
    "AuditReport",
    "Finding",
    "LogReader",
    "Reason",
    "ReleaseError",
    "ReleaseSignerError",
    "ReleaseStateError",
    "SignedRelease",
    "SlotResult",
    "accepted_event",
    "audit_model",
    "content_digest",
    "model_files",
    "opt_out_event",
    "record_release",
    "release_slots",
    "sign_release",
]
