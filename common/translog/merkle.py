"""The Merkle tree of RFC 9162 (Certificate Transparency v2): hashes, the tree and its proofs.

- leaf hash  = SHA-256(0x00 || entry)
- node hash  = SHA-256(0x01 || left || right)
- MTH({})    = SHA-256("")
- MTH(D[n])  = node(MTH(D[0:k]), MTH(D[k:n])), k the largest power of two smaller than n.

:func:`verify_inclusion` and :func:`verify_consistency` run offline and raise a
:class:`VerificationError` subclass on any failure. Arguments that cannot describe a proof at
all (an index at or past the tree size, an old size larger than the new one, a hash of the wrong
length) raise :class:`InvalidInputError`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Final

from flexfed.common.errors import (
    InvalidInputError,
    VerificationError,
)

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()


class InclusionProofError(VerificationError):
    """An inclusion proof does not lead from the leaf to the claimed root."""


class ConsistencyProofError(VerificationError):
    """A consistency proof does not show the old tree is a prefix of the new one."""


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
        check_index(index, self.size, "leaf index", "tree size")
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
        check_index(index, tree_size, "leaf index", "tree size")
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


def check_index(index: int, size: int, what: str, of: str) -> None:
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
    check_index(index, tree_size, "leaf index", "tree size")
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
