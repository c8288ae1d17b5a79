"""Signed checkpoints: a log's commitment to its first n entries, in the C2SP tlog-checkpoint shape.

Text form of the body: ``<origin>\\n<tree_size>\\n<base64 root_hash>\\n``, signed as a C2SP
signed note with ECDSA P-256 / SHA-256. Auditors need nothing but this module, the Merkle tree
(:mod:`flexfed.common.translog.merkle`) and the log's public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import (
    InvalidInputError,
    VerificationError,
)
from flexfed.common.translog.merkle import HASH_SIZE

SIGNATURE_ALGORITHM: Final = "ecdsa-p256-sha256"
KEY_ID_SIZE: Final = 4
_SIG_PREFIX = "\u2014 "  # C2SP signed-note signature lines start with an em dash and a space.


class CheckpointSignatureError(VerificationError):
    """A checkpoint's signature is invalid, or made by another key, or for another log."""


class CheckpointFormatError(InvalidInputError):
    """A checkpoint or signed checkpoint is malformed."""


# --- checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A log's commitment to its first ``tree_size`` entries (C2SP tlog-checkpoint body).

    Text form: ``<origin>\\n<tree_size>\\n<base64 root_hash>\\n``. The origin names the log; it
    is non-empty printable ASCII without spaces or ``+`` (it doubles as the signer's name).
    """

    origin: str
    tree_size: int
    root_hash: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.origin, str) or not self.origin:
            raise CheckpointFormatError("checkpoint origin must be a non-empty string")
        if not all("!" <= ch <= "~" and ch != "+" for ch in self.origin):
            raise CheckpointFormatError(
                f"checkpoint origin {self.origin!r} must be printable ASCII without "
                "spaces or '+', e.g. 'consortium.example.org/log'"
            )
        if isinstance(self.tree_size, bool) or not isinstance(self.tree_size, int):
            raise CheckpointFormatError("checkpoint tree size must be an integer")
        if self.tree_size < 0:
            raise CheckpointFormatError(f"checkpoint tree size {self.tree_size} is negative")
        if not isinstance(self.root_hash, bytes) or len(self.root_hash) != HASH_SIZE:
            raise CheckpointFormatError(f"checkpoint root hash must be {HASH_SIZE} bytes")

    def to_text(self) -> str:
        """The checkpoint body: the exact text that is signed."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        return f"{self.origin}\n{self.tree_size}\n{root}\n"

    @classmethod
    def from_text(cls, text: str) -> Checkpoint:
        """Parse a checkpoint body strictly (three lines, canonical number and base64)."""
        lines = text.split("\n")
        if len(lines) != 4 or lines[3] != "":
            raise CheckpointFormatError(
                "a checkpoint is three newline-terminated lines: origin, tree size, root hash"
            )
        origin, size, root = lines[:3]
        if not size.isascii() or not size.isdigit() or (size != "0" and size.startswith("0")):
            raise CheckpointFormatError(f"checkpoint tree size {size!r} is not a plain decimal")
        if len(size) > 20 or int(size) >= 1 << 64:
            raise CheckpointFormatError(f"checkpoint tree size {size} does not fit in 64 bits")
        return cls(origin, int(size), _b64decode(root, "checkpoint root hash"))


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint body with an ECDSA P-256 / SHA-256 signature (DER) by the log's key.

    ``key_id`` (4 bytes) names the signing key: the first bytes of SHA-256 over its
    SubjectPublicKeyInfo DER. Text form, shaped like a C2SP signed note::

        <checkpoint body>
        <blank line>
        — <origin> <base64(key_id || DER signature)>
    """

    body: str
    key_id: bytes
    signature: bytes

    def to_text(self) -> str:
        """The signed note: body, a blank line, one signature line."""
        origin = self.body.split("\n", 1)[0]
        sig = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{self.body}\n{_SIG_PREFIX}{origin} {sig}\n"

    @classmethod
    def from_text(cls, text: str | bytes) -> SignedCheckpoint:
        """Parse the signed-note form (nothing is verified here: see :func:`verify_checkpoint`)."""
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CheckpointFormatError("signed checkpoint is not UTF-8 text") from err
        body, sep, sig_block = text.partition("\n\n")
        if not sep:
            raise CheckpointFormatError("signed checkpoint has no blank line before its signature")
        body += "\n"
        origin = body.split("\n", 1)[0]
        sig_line = sig_block.removesuffix("\n")
        prefix = f"{_SIG_PREFIX}{origin} "
        if sig_block == sig_line or "\n" in sig_line or not sig_line.startswith(prefix):
            raise CheckpointFormatError(
                f"signed checkpoint must end with exactly one line '{prefix}<base64 signature>'"
            )
        blob = _b64decode(sig_line[len(prefix) :], "checkpoint signature")
        if len(blob) <= KEY_ID_SIZE:
            raise CheckpointFormatError("checkpoint signature is too short")
        return cls(body, blob[:KEY_ID_SIZE], blob[KEY_ID_SIZE:])

    def to_json(self) -> str:
        """A JSON object with the body, key id (hex) and signature (base64 DER)."""
        return json.dumps(
            {
                "algorithm": SIGNATURE_ALGORITHM,
                "checkpoint": self.body,
                "key_id": self.key_id.hex(),
                "signature": base64.b64encode(self.signature).decode("ascii"),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SignedCheckpoint:
        """Parse the form written by :meth:`to_json` (nothing is verified here)."""
        try:
            doc = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise CheckpointFormatError(f"signed checkpoint is not valid JSON: {err}") from err
        keys = {"algorithm", "checkpoint", "key_id", "signature"}
        if not isinstance(doc, dict) or set(doc) != keys:
            raise CheckpointFormatError(f"signed checkpoint JSON must have exactly {sorted(keys)}")
        if doc["algorithm"] != SIGNATURE_ALGORITHM:
            raise CheckpointFormatError(
                f"checkpoint algorithm {doc['algorithm']!r} is not {SIGNATURE_ALGORITHM!r}"
            )
        if not all(isinstance(doc[k], str) for k in keys):
            raise CheckpointFormatError("signed checkpoint JSON values must be strings")
        try:
            key_id = bytes.fromhex(doc["key_id"])
        except ValueError as err:
            raise CheckpointFormatError("checkpoint key_id is not hex") from err
        if len(key_id) != KEY_ID_SIZE or key_id.hex() != doc["key_id"]:
            raise CheckpointFormatError(f"checkpoint key_id must be {KEY_ID_SIZE} bytes, lower hex")
        return cls(doc["checkpoint"], key_id, _b64decode(doc["signature"], "checkpoint signature"))


def key_id(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The 4-byte id of a log key: SHA-256 of its SubjectPublicKeyInfo DER, truncated."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:KEY_ID_SIZE]


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    """Load a log's P-256 public key from PEM, refusing any other kind of key."""
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as err:
        raise InvalidInputError(f"not a PEM public key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidInputError("the log public key must be an ECDSA P-256 key")
    return key


def sign_checkpoint(
    checkpoint: Checkpoint, private_key: ec.EllipticCurvePrivateKey
) -> SignedCheckpoint:
    """Sign a checkpoint body with the log's P-256 key (ECDSA, SHA-256, DER signature)."""
    _require_p256(private_key, "private key")
    body = checkpoint.to_text()
    signature = private_key.sign(body.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    return SignedCheckpoint(body, key_id(private_key.public_key()), signature)


def verify_checkpoint(
    signed: SignedCheckpoint,
    public_key: ec.EllipticCurvePublicKey,
    *,
    origin: str | None = None,
) -> Checkpoint:
    """Verify a signed checkpoint against the log's public key; return what it commits to.

    With ``origin``, also refuse a checkpoint of any other log. Raises
    :class:`CheckpointSignatureError` on a wrong key, a bad signature or a wrong origin.
    """
    _require_p256(public_key, "public key")
    expected = key_id(public_key)
    if signed.key_id != expected:
        raise CheckpointSignatureError(
            f"checkpoint is signed by key {signed.key_id.hex()}, not by the log key "
            f"{expected.hex()}"
        )
    try:
        public_key.verify(signed.signature, signed.body.encode("utf-8"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as err:
        raise CheckpointSignatureError(
            "checkpoint signature does not verify: it was altered or not made by the log key"
        ) from err
    checkpoint = Checkpoint.from_text(signed.body)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointSignatureError(
            f"checkpoint is for log {checkpoint.origin!r}, not {origin!r}"
        )
    return checkpoint


def _require_p256(key: object, what: str) -> None:
    if not isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) or not (
        isinstance(key.curve, ec.SECP256R1)
    ):
        raise InvalidInputError(f"the log {what} must be an ECDSA P-256 key")


def _b64decode(text: str, what: str) -> bytes:
    """Strict standard base64: valid alphabet, padding, and the canonical encoding."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error) as err:
        raise CheckpointFormatError(f"{what} is not valid base64") from err
    if base64.b64encode(data).decode("ascii") != text:
        raise CheckpointFormatError(f"{what} is not canonical base64")
    return data
