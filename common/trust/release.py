"""Releasing an assembled model: the operator records it in the log, then signs it.

After :func:`~flexfed.common.moe.assembly.assemble` (or :func:`~flexfed.common.moe.optout.optout`),
in two steps:

1. :func:`record_release` logs it in the transparency log: an ``expert-accepted`` entry per
   expert not yet logged, an ``opt-out`` entry per removed expert not yet withdrawn, then one
   ``assembly-released`` entry (the model's content digest and its slots). It writes each
   slot's ``log_index``, ``release_log_index`` and a signed log checkpoint into assembly.json.
2. :func:`sign_release` signs the whole directory with the operator's certificate: a
   ``model.sig`` at the root, an OpenSSF model-signing bundle, per-file SHA-256 over every
   file but itself (assembly.json and provenance/ included).

:func:`model_files` and :func:`content_digest` say what a release covers; the auditor's side,
which checks all of it, is :func:`flexfed.common.trust.audit.audit_model`.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import InvalidInputError, MissingFileError
from flexfed.common.moe.assembly import ASSEMBLY_FILE
from flexfed.common.moe.optout import AssembledModel
from flexfed.common.translog.filelog import FileLog
from flexfed.common.trust.log_events import (
    _is_acceptance,
    _read_events,
    _withdrawal,
    accepted_event,
    entry_bytes,
    opt_out_event,
    parse_entry,
    release_slots,
)
from flexfed.common.trust.pki import Identity, PathLike, identity_of, load_certificate, verify_chain
from flexfed.common.trust.signing import load_private_key
from flexfed.common.util.clock import as_utc, utc_now, utc_now_iso
from flexfed.common.util.digest import manifest_digest, sha256_file
from flexfed.common.util.fs import atomic_write_text
from flexfed.common.util.jsonio import dumps_pretty

logger = logging.getLogger(__name__)

RELEASE_SIGNATURE = "model.sig"


# --- errors --------------------------------------------------------------------------------


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
    when = time or utc_now_iso()
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
    atomic_write_text(root / ASSEMBLY_FILE, dumps_pretty(assembly))
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
    when = as_utc(at) if at is not None else utc_now()
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


__all__ = [
    "RELEASE_SIGNATURE",
    "ReleaseError",
    "ReleaseSignerError",
    "ReleaseStateError",
    "SignedRelease",
    "content_digest",
    "model_files",
    "record_release",
    "sign_release",
]
