"""Auditing a released model: every expert checked without trusting the coordinator.

:func:`audit_model` is the auditor's side of a release (:mod:`flexfed.common.trust.release` is the
operator's). It needs the consortium CA certificate and, optionally, the CRL, the log file with
the log's public key, and the anchor. It checks:

- the root ``model.sig``: a valid OMS signature by an operator certificate of the CA (chain,
  role, revocation at ``at``), covering exactly the files present, each unchanged;
- each expert slot: the signed expert is rebuilt from the checkpoint (the slot's FFN tensors
  and router row) plus what :mod:`~flexfed.common.moe.assembly` keeps under
  ``provenance/<org>--<name>/`` (the router biases and the original safetensors header), and
  the rebuilt bundle goes through :class:`~flexfed.common.trust.signing.BundleVerifier`: owner
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
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import (
    ConfigError,
    FlexfedError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.formats.anchor import ANCHOR_FILE, PROJECTION_FILE, ROUTER_FILE, Anchor
from flexfed.common.formats.bundle import EXPERT_META, EXPERT_WEIGHTS, PROVENANCE, SIGNATURE
from flexfed.common.formats.checkpoint import companion_files
from flexfed.common.formats.families import PROJECTIONS
from flexfed.common.formats.safetensors_io import DTYPE_SIZES, TensorInfo
from flexfed.common.moe.assembly import (
    ASSEMBLY_FILE,
    PROVENANCE_DIR,
    ROUTER_BIAS_FILE,
    WEIGHTS_HEADER_FILE,
    RebuildError,
    rebuild_expert_weights,
    slot_dir_name,
)
from flexfed.common.moe.optout import AssembledModel
from flexfed.common.moe.privacy import privacy_summary
from flexfed.common.translog.checkpoint import (
    CheckpointFormatError,
    CheckpointSignatureError,
    SignedCheckpoint,
    load_public_key,
    verify_checkpoint,
)
from flexfed.common.translog.merkle import (
    ConsistencyProofError,
    InclusionProofError,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from flexfed.common.trust.audit_report import AuditReport, Reason, SlotResult
from flexfed.common.trust.log_events import (
    LogReader,
    _is_acceptance,
    _read_events,
    _withdrawal,
    open_log,
    release_slots,
)
from flexfed.common.trust.pki import (
    CertificateError,
    CertificateRevokedError,
    CertificateRoleError,
    CrlError,
    PathLike,
    load_certificate,
    load_crl,
    verify_chain,
)
from flexfed.common.trust.provenance import ProvenanceError
from flexfed.common.trust.release import RELEASE_SIGNATURE, content_digest, model_files
from flexfed.common.trust.signing import (
    AnchorDigestMismatchError,
    BundleVerifier,
    SignerOrgMismatchError,
    TamperedMetadataError,
    TamperedWeightsError,
)
from flexfed.common.util.clock import as_utc, utc_now
from flexfed.common.util.digest import sha256_file

MAX_RELEASE_SIGNATURE_BYTES = 16 * 1024 * 1024  # one manifest line per file: KiBs in practice
_REBUILD_FILES = frozenset(
    {EXPERT_META, SIGNATURE, PROVENANCE, ROUTER_BIAS_FILE, WEIGHTS_HEADER_FILE}
)
_CHUNK = 8 * 1024 * 1024


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
            f"{log}: open a coordinator's log with flexfed.common.api.remote_log.open_remote_log "
            "(flexfed audit verify --log grpcs://... does)"
        )
    if not path.is_file():
        raise MissingFileError(f"log file not found: {path}")
    # NOTE: FileLog takes the writer's lock and may cut a torn tail; an auditor's copy keeps
    # both away from the operator's file (and from a read-only fixture).
    with tempfile.TemporaryDirectory(prefix="flexfed-log-") as tmp:
        copy = Path(tmp) / path.name
        shutil.copyfile(path, copy)
        with open_log(copy) as opened:
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
    when = as_utc(at) if at is not None else utc_now()
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

    # FIX (issue 12; docs/pki.md): each expert's certificate is judged at the time its
    # acceptance was logged, not at the audit's time: after a routine key rotation (revoked
    # as superseded) or a certificate's expiry, what was signed and accepted before still
    # verifies; a key-compromise revocation voids it for every time (verify_chain).
    accepted_at = _acceptance_times(model, log) if log is not None else {}
    if accepted_at:
        report.checked.append("each expert's certificate at its acceptance time in the log")
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
            ca,
            revocations,
            expected_anchor_digest=report.anchor_digest,
            at=accepted_at.get(result.slot, when),
            crl_fresh_at=when,
        )
        _check_expert_slot(result, model, verifier, workdir)

    if log is None and public_log_key is None:
        report.not_checked.append("transparency log (no log given)")
    else:
        assert public_log_key is not None
        _check_log(report, model, log, public_log_key, log_origin)
    return report


def _acceptance_times(model: AssembledModel, log: LogReader | PathLike) -> dict[int, dt.datetime]:
    """slot -> the time of its expert's acceptance entry, for the slots whose entry is one.

    The entries' inclusion in the release's checkpoint is proven by _check_log, which fails
    any slot whose entry is not its acceptance; a time read here is used only for such a slot.
    """
    times: dict[int, dt.datetime] = {}
    try:
        with _opened_log(log) as reader:
            events = _read_events(reader)
    except FlexfedError:
        return times  # an unreadable log is _check_log's finding
    for slot, record in enumerate(model.slots):
        index = record.get("log_index") if slot > 0 else None
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(events):
            continue
        event = events[index]
        if not _is_acceptance(event, record):
            continue
        try:
            times[slot] = as_utc(dt.datetime.fromisoformat(str(event.get("time"))))
        except ValueError:
            continue
    return times


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
    problems = _release_files_problems(model, anchor)
    if problems:
        report.fail(Reason.RELEASE_FILES_MISMATCH, "; ".join(problems))
        return
    report.checked.append("anchor")


def _release_files_problems(model: AssembledModel, anchor: Anchor) -> list[str]:
    """What in the release's other files is not what assembly from the anchor writes.

    FIX (issue 12): the audit compared tensors only, so an operator who swapped two token ids
    in tokenizer.json and changed rms_norm_eps and rope_theta in config.json, then recorded
    and signed the release, got PASS. Now: ``config.json`` must be exactly the family's MoE
    config of the anchor's config for the release's slots and top-k (the one value the
    operator chooses); every other top-level file must be byte-identical to the anchor's file
    of that name (tokenizer, generation config, ...), and none may be missing or added.
    """
    problems = []
    family, config = model.family, model.checkpoint.config
    expected = family.moe_config(anchor.checkpoint.config, len(model.slots), model.top_k)
    wrong = sorted(k for k in set(config) | set(expected) if config.get(k) != expected.get(k))
    if wrong:
        problems.append(f"config.json differs from the anchor's in {', '.join(wrong[:5])}")
    exclude = {ANCHOR_FILE, ROUTER_FILE, PROJECTION_FILE, "model.sig"}
    theirs = {p.name: p for p in companion_files(anchor.path, exclude=exclude)}
    ours = {
        p.name: p for p in companion_files(model.path, exclude={ASSEMBLY_FILE, RELEASE_SIGNATURE})
    }
    for name in sorted(set(theirs) | set(ours)):
        if name not in ours:
            problems.append(f"{name} of the anchor is missing")
        elif name not in theirs:
            problems.append(f"{name} is not the anchor's (added)")
        elif sha256_file(ours[name]) != sha256_file(theirs[name]):
            problems.append(f"{name} differs from the anchor's")
    return problems


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
    result.privacy = privacy_summary(verified.meta.training)
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


__all__ = ["audit_model", "public_key_of"]
