"""The transparency log: an append-only Merkle tree (RFC 9162) with signed checkpoints.

The coordinator logs every consortium event (expert accepted, opt-out, opt-in, revocation,
assembly released) as one entry: the canonical JSON bytes of the event. The tree hashing is
Certificate Transparency v2's (RFC 9162 section 2.1):

- leaf hash  = SHA-256(0x00 || entry)
- node hash  = SHA-256(0x01 || left || right)
- MTH({})    = SHA-256("")
- MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two smaller than n.

The log publishes signed :class:`Checkpoint`\\ s (origin, tree size, root hash) in the C2SP
tlog-checkpoint text shape, signed with ECDSA P-256 / SHA-256. Auditors need nothing but this
module and the log's public key: :func:`verify_checkpoint`, :func:`verify_inclusion` and
:func:`verify_consistency` run offline and raise a :class:`VerificationError` subclass on any
failure. Arguments that cannot describe a proof at all (an index at or past the tree size, an
old size larger than the new one, a hash of the wrong length) raise :class:`InvalidInputError`.

:class:`FileLog` is the durable log: records appended to one file and fsynced, a torn final
record (a crash mid-append) cut away with a warning on open. Only the 32-byte leaf hashes are
held in memory; a proof costs O(n) hashing (no interior nodes are cached yet) and O(log n)
memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import logging
import os
import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import (
    ConfigError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.util.fs import fsync_dir

try:  # NOTE: POSIX advisory locking; without it (Windows) a second writer is not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
EVENT_TYPES: Final = frozenset(
    {"expert-accepted", "opt-out", "opt-in", "revocation", "assembly-released"}
)
SIGNATURE_ALGORITHM: Final = "ecdsa-p256-sha256"
KEY_ID_SIZE: Final = 4
MAX_ENTRY_BYTES: Final = 1 << 20
LOG_MAGIC: Final = b"flexfed-tlog v1\n"
_LENGTH = struct.Struct(">I")
_MAX_RECORD: Final = _LENGTH.size + MAX_ENTRY_BYTES + HASH_SIZE
_SIG_PREFIX = "\u2014 "  # C2SP signed-note signature lines start with an em dash and a space.


# --- errors --------------------------------------------------------------------------------


class InclusionProofError(VerificationError):
    """An inclusion proof does not lead from the leaf to the claimed root."""


class ConsistencyProofError(VerificationError):
    """A consistency proof does not show the old tree is a prefix of the new one."""


class CheckpointSignatureError(VerificationError):
    """A checkpoint's signature is invalid, or made by another key, or for another log."""


class LogIntegrityError(VerificationError):
    """A log file holds a record that fails its checksum before its final record."""


class EntryError(InvalidInputError):
    """An event or entry is not a canonical JSON object with a known ``type``."""


class CheckpointFormatError(InvalidInputError):
    """A checkpoint or signed checkpoint is malformed."""


class LogFormatError(InvalidInputError):
    """A file is not a flexfed transparency log."""


class LogLockedError(ConfigError):
    """Another process has the log file open for writing."""


# --- hashing -------------------------------------------------------------------------------


def leaf_hash(entry: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || entry)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise InvalidInputError(f"{what} must be {HASH_SIZE} bytes (a SHA-256 digest)")


# --- entries -------------------------------------------------------------------------------


def entry_bytes(event: Mapping[str, Any]) -> bytes:
    """The log entry for an event: its canonical JSON (sorted keys, no spaces) as bytes.

    The event must have a ``type`` in :data:`EVENT_TYPES` and survive a JSON round trip
    unchanged (string keys, lists not tuples, finite numbers), so that the bytes an auditor
    sees decode to exactly what was logged.
    """
    if not isinstance(event, Mapping):
        raise EntryError(f"an event must be a JSON object, not {type(event).__name__}")
    kind = event.get("type")
    if kind not in EVENT_TYPES:
        raise EntryError(f"event type {kind!r} is not one of {sorted(EVENT_TYPES)}")
    try:
        data = json.dumps(event, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise EntryError(f"{kind} event is not JSON-serialisable: {err}") from err
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"{kind} event is {len(data)} bytes; the limit is {MAX_ENTRY_BYTES}")
    if json.loads(data) != dict(event):
        raise EntryError(
            f"{kind} event changes in a JSON round trip; use string keys and lists, not tuples"
        )
    return data


def parse_entry(data: bytes) -> dict[str, Any]:
    """Decode an entry back to its event, refusing anything that is not canonical."""
    try:
        event = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise EntryError(f"log entry is not valid JSON: {err}") from err
    if not isinstance(event, dict):
        raise EntryError("log entry is not a JSON object")
    if entry_bytes(event) != data:
        raise EntryError("log entry is not in canonical form (sorted keys, no whitespace)")
    return event


# --- the tree ------------------------------------------------------------------------------


class MerkleTree:
    """An in-memory RFC 9162 tree over leaf hashes only (32 bytes per leaf, no entries).

    ``root()`` of the current tree costs O(log n) (a frontier of perfect subtrees is kept);
    roots of older sizes and proofs recompute subtree hashes: O(n) hashing each.
    """

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._leaves = bytearray()  # (n * 32,) leaf hashes back to back
        self._frontier: list[bytes] = []  # roots of the perfect subtrees, largest first
        for h in leaf_hashes:
            self.append_leaf_hash(h)

    @classmethod
    def from_entries(cls, entries: Iterable[bytes]) -> MerkleTree:
        """A tree over raw entries (hashed here with :func:`leaf_hash`)."""
        return cls(leaf_hash(e) for e in entries)

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self._leaves) // HASH_SIZE

    def append(self, entry: bytes) -> int:
        """Append a raw entry; return its index."""
        return self.append_leaf_hash(leaf_hash(entry))

    def append_leaf_hash(self, h: bytes) -> int:
        """Append a leaf by its hash; return its index."""
        _check_hash(h, "leaf hash")
        index = self.size
        self._leaves += h
        # Merge equal-sized perfect subtrees, like carrying in binary addition.
        n = index
        while n & 1:
            h = node_hash(self._frontier.pop(), h)
            n >>= 1
        self._frontier.append(h)
        return index

    def leaf_hash_at(self, index: int) -> bytes:
        """The leaf hash at ``index``."""
        _check_index(index, self.size, "leaf index", "tree size")
        return bytes(self._leaves[index * HASH_SIZE : (index + 1) * HASH_SIZE])

    def root(self, tree_size: int | None = None) -> bytes:
        """MTH of the first ``tree_size`` leaves (default: all of them)."""
        if tree_size is None or tree_size == self.size:
            if not self._frontier:
                return EMPTY_ROOT
            h = self._frontier[-1]
            for left in reversed(self._frontier[:-1]):
                h = node_hash(left, h)
            return h
        self._check_size(tree_size)
        return self._mth(0, tree_size) if tree_size else EMPTY_ROOT

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """PATH(index, D[tree_size]) of RFC 9162 2.1.3.1: sibling hashes, leaf level first."""
        self._check_size(tree_size)
        _check_index(index, tree_size, "leaf index", "tree size")
        proof: list[bytes] = []
        start, end = 0, tree_size
        # Walk down from the root; each step records the subtree the leaf is not in.
        while end - start > 1:
            k = _split(end - start)
            if index - start < k:
                proof.append(self._mth(start + k, end))
                end = start + k
            else:
                proof.append(self._mth(start, start + k))
                start += k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """PROOF(old_size, D[new_size]) of RFC 9162 2.1.4.1 (empty if old is 0 or equal)."""
        self._check_size(new_size)
        _check_sizes(old_size, new_size)
        if old_size in (0, new_size):
            return []
        proof: list[bytes] = []
        start, end, m = 0, new_size, old_size
        whole = True  # SUBPROOF's b: the old tree is still a whole subtree we know the root of
        while m != end - start:
            k = _split(end - start)
            if m <= k:
                proof.append(self._mth(start + k, end))
                end = start + k
            else:
                proof.append(self._mth(start, start + k))
                start, m, whole = start + k, m - k, False
        if not whole:
            proof.append(self._mth(start, end))
        proof.reverse()
        return proof

    def _check_size(self, tree_size: int) -> None:
        if not 0 <= tree_size <= self.size:
            raise InvalidInputError(f"tree size {tree_size} is not in 0..{self.size}")

    def _mth(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for end > start; recursion depth is log2 of the range."""
        if end - start == 1:
            return bytes(self._leaves[start * HASH_SIZE : end * HASH_SIZE])
        k = _split(end - start)
        return node_hash(self._mth(start, start + k), self._mth(start + k, end))


def _check_index(index: int, size: int, what: str, of: str) -> None:
    if not 0 <= index < size:
        raise InvalidInputError(f"{what} {index} is out of range for {of} {size}")


def _check_sizes(old_size: int, new_size: int) -> None:
    if not 0 <= old_size <= new_size:
        raise InvalidInputError(
            f"old tree size {old_size} must be between 0 and the new size {new_size}"
        )


# --- offline verification (RFC 9162 2.1.3.2 and 2.1.4.2) ----------------------------------


def verify_inclusion(
    leaf_hash: bytes, index: int, tree_size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``tree_size`` with ``root``.

    The algorithm of RFC 9162 section 2.1.3.2, step by step. Returns nothing; raises
    :class:`InclusionProofError` if the proof does not verify.
    """
    _check_hash(leaf_hash, "leaf hash")
    _check_hash(root, "root hash")
    # 1. leaf_index >= tree_size can never be proven: a bad argument, not a bad proof.
    _check_index(index, tree_size, "leaf index", "tree size")
    _check_proof_hashes(proof, InclusionProofError, "inclusion")
    # 2.-3.
    fn, sn = index, tree_size - 1
    r = leaf_hash
    # 4.
    for p in proof:
        if sn == 0:  # a.
            raise InclusionProofError(
                f"inclusion proof for leaf {index} of {tree_size} has too many hashes"
            )
        if fn & 1 or fn == sn:  # b.
            r = node_hash(p, r)
            while fn and not fn & 1:  # ii. (a no-op when LSB(fn) is set)
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1  # c.
        sn >>= 1
    # 5.
    if sn != 0:
        raise InclusionProofError(
            f"inclusion proof for leaf {index} of {tree_size} is missing hashes"
        )
    if r != root:
        raise InclusionProofError(
            f"leaf {index} is not in the tree of size {tree_size} with root {root.hex()}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree (old_size, old_root) is a prefix of the tree (new_size, new_root).

    The algorithm of RFC 9162 section 2.1.4.2 for 0 < old_size < new_size. The edge cases the
    RFC leaves out are decided strictly: equal sizes need equal roots and an empty proof; an
    old size of 0 needs the empty-tree root and an empty proof. Raises
    :class:`ConsistencyProofError` if the proof does not verify.
    """
    _check_hash(old_root, "old root hash")
    _check_hash(new_root, "new root hash")
    _check_sizes(old_size, new_size)
    _check_proof_hashes(proof, ConsistencyProofError, "consistency")
    if old_size == 0 or old_size == new_size:
        if proof:
            raise ConsistencyProofError(
                f"consistency proof from {old_size} to {new_size} must be empty"
            )
        if old_size == 0 and old_root != EMPTY_ROOT:
            raise ConsistencyProofError("the root of an empty tree must be SHA-256 of nothing")
        if old_size == new_size and old_root != new_root:
            raise ConsistencyProofError(
                f"two different roots for the same tree size {old_size}: the log forked"
            )
        return
    # 1.
    if not proof:
        raise ConsistencyProofError(f"consistency proof from {old_size} to {new_size} is empty")
    path = list(proof)
    # 2.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 3.
    fn, sn = old_size - 1, new_size - 1
    # 4.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5.
    fr = sr = path[0]
    # 6.
    for c in path[1:]:
        if sn == 0:  # a.
            raise ConsistencyProofError(
                f"consistency proof from {old_size} to {new_size} has too many hashes"
            )
        if fn & 1 or fn == sn:  # b.
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while fn and not fn & 1:  # iii. (a no-op when LSB(fn) is set)
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1  # c.
        sn >>= 1
    # 7.
    if sn != 0:
        raise ConsistencyProofError(
            f"consistency proof from {old_size} to {new_size} is missing hashes"
        )
    if fr != old_root:
        raise ConsistencyProofError(
            f"consistency proof does not lead to the old root {old_root.hex()} (size {old_size})"
        )
    if sr != new_root:
        raise ConsistencyProofError(
            f"tree of size {new_size} with root {new_root.hex()} does not extend the tree of "
            f"size {old_size}: the log rewrote history"
        )


def _check_proof_hashes(proof: Sequence[bytes], error: type[VerificationError], what: str) -> None:
    for i, p in enumerate(proof):
        if not isinstance(p, bytes) or len(p) != HASH_SIZE:
            raise error(f"{what} proof hash #{i} is not a {HASH_SIZE}-byte SHA-256 digest")


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


# --- the file-backed log -------------------------------------------------------------------


class FileLog:
    """An append-only transparency log in one file, for a single writer.

    File layout: :data:`LOG_MAGIC`, then one record per entry:
    ``u32 big-endian length || entry || leaf_hash(entry)``. The stored leaf hash doubles as
    the record's checksum. Every append is fsynced before its index is returned.

    On open, every record is re-hashed and checked. A bad or incomplete *final* record (or a
    zero-filled tail) is what a crash mid-append leaves: it is truncated away with a warning,
    ``truncated_bytes`` says how much, and its bytes are kept in ``<log>.torn-<offset>``.
    Anything else that fails its checksum is never repaired: :class:`LogIntegrityError`.
    Memory: the leaf hashes (32 bytes) and record offsets (8 bytes) per entry; entries stay
    on disk.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._tree = MerkleTree()
        self._offsets = array("Q")  # (n,) byte offset of each record
        self.truncated_bytes = 0
        if not self.path.parent.is_dir():
            raise MissingFileError(f"directory for the log not found: {self.path.parent}")
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as err:
                    raise LogLockedError(
                        f"{self.path} is open for writing by another process; a log has one writer"
                    ) from err
            self._end = self._load()
            if created:
                fsync_dir(self.path.parent)
        except BaseException:
            os.close(self._fd)
            raise

    def __enter__(self) -> FileLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (and release the writer lock)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def size(self) -> int:
        """Number of entries."""
        return self._tree.size

    def append(self, event: Mapping[str, Any]) -> int:
        """Log an event durably; return its index once it is on disk."""
        data = entry_bytes(event)
        h = leaf_hash(data)
        record = _LENGTH.pack(len(data)) + data + h
        self._write_at(self._end, record)
        index = self._tree.append_leaf_hash(h)
        self._offsets.append(self._end)
        self._end += len(record)
        return index

    def root(self, tree_size: int | None = None) -> bytes:
        """MTH of the first ``tree_size`` entries (default: all)."""
        return self._tree.root(tree_size)

    def entry(self, index: int) -> bytes:
        """The raw bytes of entry ``index`` (what the leaf hash is over)."""
        _check_index(index, self.size, "entry index", "log size")
        offset = self._offsets[index]
        (length,) = _LENGTH.unpack(os.pread(self._fd, _LENGTH.size, offset))
        return os.pread(self._fd, length, offset + _LENGTH.size)

    def entries(self, start: int, end: int) -> list[bytes]:
        """The raw entries ``start`` up to (not including) ``end``."""
        if not 0 <= start <= end <= self.size:
            raise InvalidInputError(f"entry range [{start}, {end}) is not within 0..{self.size}")
        return [self.entry(i) for i in range(start, end)]

    def leaf_hash_at(self, index: int) -> bytes:
        """The leaf hash of entry ``index``."""
        return self._tree.leaf_hash_at(index)

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        """Inclusion proof of entry ``index`` in the tree of ``tree_size`` (O(n) hashing)."""
        return self._tree.inclusion_proof(index, tree_size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """Consistency proof between two sizes of this log (O(n) hashing)."""
        return self._tree.consistency_proof(old_size, new_size)

    def checkpoint(self, origin: str, private_key: ec.EllipticCurvePrivateKey) -> SignedCheckpoint:
        """Sign a checkpoint of the log as it is now."""
        return sign_checkpoint(Checkpoint(origin, self.size, self.root()), private_key)

    def _write_at(self, offset: int, data: bytes) -> None:
        try:
            written = 0
            while written < len(data):
                written += os.pwrite(self._fd, data[written:], offset + written)
            os.fsync(self._fd)
        except OSError:
            # NOTE: leave no partial record behind for the next append to write after.
            try:
                os.ftruncate(self._fd, offset)
            except OSError:
                logger.exception("could not cut a failed write from %s", self.path)
            raise

    def _load(self) -> int:
        """Read and check every record; cut a torn tail; return the end of the last record."""
        file_size = os.fstat(self._fd).st_size
        with open(self._fd, "rb", closefd=False, buffering=1 << 20) as f:
            head = f.read(len(LOG_MAGIC))
            if head != LOG_MAGIC:
                if not LOG_MAGIC.startswith(head):
                    raise LogFormatError(f"{self.path} is not a flexfed transparency log")
                # Empty, or created by a crash before its header was complete.
                if head:
                    self._cut(0, file_size, "an incomplete header", b"")
                self._write_at(0, LOG_MAGIC)
                return len(LOG_MAGIC)
            offset = len(LOG_MAGIC)
            while offset < file_size:
                problem = self._read_record(f, offset, file_size)
                if problem is None:
                    offset = f.tell()
                    continue
                why, length = problem
                tail = b""
                if file_size - offset <= _MAX_RECORD:
                    f.seek(offset)
                    tail = f.read()
                if tail and _is_torn(tail, length):
                    self._cut(offset, file_size, why, tail)
                    break
                raise LogIntegrityError(
                    f"{self.path}: record {self.size} at byte {offset} is corrupt ({why}) and "
                    "is not a torn last append; restore the log from a replica"
                )
        return offset

    def _read_record(
        self, f: BinaryIO, offset: int, file_size: int
    ) -> tuple[str, int | None] | None:
        """Add the record at ``offset`` to the tree, or say what is wrong and its length."""
        header = f.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return "an incomplete length prefix", None
        (length,) = _LENGTH.unpack(header)
        if not 0 < length <= MAX_ENTRY_BYTES:
            return f"an impossible length {length}", length
        if offset + _LENGTH.size + length + HASH_SIZE > file_size:
            return "an incomplete record", length
        data = f.read(length)
        h = leaf_hash(data)
        if f.read(HASH_SIZE) != h:
            return "a checksum mismatch", length
        try:
            parse_entry(data)
        except EntryError as err:
            # The checksum matched: this was written on purpose, not torn by a crash.
            raise LogIntegrityError(f"{self.path}: entry {self.size} is invalid: {err}") from err
        self._tree.append_leaf_hash(h)
        self._offsets.append(offset)
        return None

    def _cut(self, offset: int, file_size: int, why: str, tail: bytes) -> None:
        """Truncate a torn tail, keeping its bytes beside the log as evidence."""
        kept = f", kept in {self._keep(offset, tail)}" if tail.strip(b"\x00") else ""
        logger.warning(
            "%s: truncated %d bytes of a torn final record (%s) left by an interrupted append%s",
            self.path,
            file_size - offset,
            why,
            kept,
        )
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self.truncated_bytes = file_size - offset

    def _keep(self, offset: int, tail: bytes) -> Path:
        for n in itertools.count():
            path = self.path.with_name(f"{self.path.name}.torn-{offset}" + (f".{n}" if n else ""))
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                continue
            try:
                os.write(fd, tail)
                os.fsync(fd)
            finally:
                os.close(fd)
            return path
        raise AssertionError("unreachable")  # pragma: no cover


def _is_torn(tail: bytes, length: int | None) -> bool:
    """Whether the bytes from a bad record to the end of file can be one interrupted append.

    An append writes one record of at most :data:`_MAX_RECORD` bytes and is fsynced before the
    next starts, so a crash leaves a prefix of that one record, possibly with blocks the
    file system had not yet filled (zeros). A bad record with more after it is corruption.
    """
    if length is None or not tail.strip(b"\x00"):
        return True  # the length prefix itself was cut, or nothing of the record landed
    return 0 < length <= MAX_ENTRY_BYTES and len(tail) <= _LENGTH.size + length + HASH_SIZE
