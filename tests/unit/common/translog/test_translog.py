"""The transparency log: RFC 9162 hashing and proofs, checkpoints, the file log, golden files."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexfed.common.errors import (
    FlexfedError,
    InvalidInputError,
    MissingFileError,
    VerificationError,
)
from flexfed.common.translog.checkpoint import (
    Checkpoint,
    CheckpointFormatError,
    CheckpointSignatureError,
    SignedCheckpoint,
    key_id,
    load_public_key,
    sign_checkpoint,
    verify_checkpoint,
)
from flexfed.common.translog.entries import EntryError
from flexfed.common.translog.filelog import (
    LOG_MAGIC,
    FileLog,
    LogFormatError,
    LogIntegrityError,
    LogLockedError,
)
from flexfed.common.translog.merkle import (
    EMPTY_ROOT,
    ConsistencyProofError,
    InclusionProofError,
    MerkleTree,
    leaf_hash,
    node_hash,
    verify_consistency,
    verify_inclusion,
)
from flexfed.common.trust.log_events import entry_bytes, open_log, parse_entry

FIXTURES = Path(__file__).resolve().parents[3] / "fixtures" / "translog"


def h(hexes: str) -> list[bytes]:
    return [bytes.fromhex(x) for x in hexes.split()]


def flip(data: bytes, i: int, bit: int = 1) -> bytes:
    return data[:i] + bytes([data[i] ^ bit]) + data[i + 1 :]


# --- (1) the Certificate Transparency test vectors ----------------------------------------
# The standard RFC 6962 / RFC 9162 test data of the CT implementations (the same values as
# google/certificate-transparency's C++ merkle_tree_test.cc), copied from
# https://github.com/transparency-dev/merkle:
#   testonly/constants.go (LeafInputs, NodeHashes, RootHashes)
#     at commit 582a6ad190b6848f1d26f8bf08ddef29955d9db1
#   proof/verify_test.go (inclusionProofs, consistencyProofs, and the corruptions applied to them)
#     at commit 02194e9afb6c1d95b5381350007963aa70fff472
# There the inclusion vectors number leaves from 1; here they are the 0-based index.

CT_LEAVES = [
    bytes.fromhex(x)
    for x in [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
]
CT_LEAF_HASHES = h(
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d "
    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7 "
    "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7 "
    "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7 "
    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b "
    "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658 "
    "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f "
    "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1"
)
CT_ROOTS = h(  # by tree size 0..8
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 "
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d "
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125 "
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77 "
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7 "
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4 "
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef "
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c "
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
)
CT_INCLUSION = [  # (index, tree size, proof)
    (0, 1, []),
    (
        0,
        8,
        h(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7 "
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e "
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
        ),
    ),
    (
        5,
        8,
        h(
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b "
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0 "
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"
        ),
    ),
    (2, 3, h("fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125")),
    (
        1,
        5,
        h(
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d "
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e "
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"
        ),
    ),
]
CT_CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (
        1,
        8,
        h(
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7 "
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e "
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"
        ),
    ),
    (
        6,
        8,
        h(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a "
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0 "
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"
        ),
    ),
    (
        2,
        5,
        h(
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e "
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"
        ),
    ),
    (
        6,
        7,
        h(
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a "
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f "
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"
        ),
    ),
]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert CT_ROOTS[0] == EMPTY_ROOT
    assert MerkleTree().root() == EMPTY_ROOT


def test_leaf_hashes_match_ct_vectors() -> None:
    assert [leaf_hash(x) for x in CT_LEAVES] == CT_LEAF_HASHES


@pytest.mark.parametrize("n", range(9))
def test_roots_match_ct_vectors(n: int) -> None:
    assert MerkleTree.from_entries(CT_LEAVES[:n]).root() == CT_ROOTS[n]
    assert MerkleTree.from_entries(CT_LEAVES).root(n) == CT_ROOTS[n]


@pytest.mark.parametrize(("index", "size", "proof"), CT_INCLUSION)
def test_inclusion_proofs_match_ct_vectors(index: int, size: int, proof: list[bytes]) -> None:
    tree = MerkleTree.from_entries(CT_LEAVES)
    assert tree.inclusion_proof(index, size) == proof
    verify_inclusion(CT_LEAF_HASHES[index], index, size, proof, CT_ROOTS[size])


@pytest.mark.parametrize(("old", "new", "proof"), CT_CONSISTENCY)
def test_consistency_proofs_match_ct_vectors(old: int, new: int, proof: list[bytes]) -> None:
    tree = MerkleTree.from_entries(CT_LEAVES)
    assert tree.consistency_proof(old, new) == proof
    verify_consistency(old, new, CT_ROOTS[old], CT_ROOTS[new], proof)


@pytest.mark.parametrize(("index", "size", "proof"), CT_INCLUSION[1:])
def test_ct_inclusion_vectors_fail_when_corrupted(
    index: int, size: int, proof: list[bytes]
) -> None:
    """The corruptions transparency-dev's verifier tests apply to these vectors."""
    leaf, root = CT_LEAF_HASHES[index], CT_ROOTS[size]
    probes: list[tuple[int, int, bytes, bytes, Sequence[bytes]]] = [
        (index - 1, size, leaf, root, proof),
        (index + 1, size, leaf, root, proof),
        (index ^ 2, size, leaf, root, proof),
        (index, size * 2, leaf, root, proof),
        (index, size // 2, leaf, root, proof),
        (index, size, SOME_HASH, root, proof),
        (index, size, leaf, EMPTY_ROOT, proof),
        (index, size, leaf, SOME_HASH, proof),
        (index, size, leaf, root, [*proof, b""]),
        (index, size, leaf, root, [*proof, root]),
        (index, size, leaf, root, [b"", *proof]),
        (index, size, leaf, root, [root, *proof]),
        (index, size, leaf, root, proof[:-1]),
        (index, size, leaf, root, [proof[0], SOME_HASH, *proof[1:]]),
    ]
    probes += [
        (index, size, leaf, root, [*proof[:i], flip(proof[i], 0, 8), *proof[i + 1 :]])
        for i in range(len(proof))
    ]
    for i, s, lf, rt, pf in probes:
        # An index outside the tree is a bad argument; anything else is a failed proof.
        with pytest.raises((InclusionProofError, InvalidInputError)):
            verify_inclusion(lf, i, s, pf, rt)


@pytest.mark.parametrize(("old", "new", "proof"), CT_CONSISTENCY[1:])
def test_ct_consistency_vectors_fail_when_corrupted(old: int, new: int, proof: list[bytes]) -> None:
    r1, r2 = CT_ROOTS[old], CT_ROOTS[new]
    probes: list[tuple[int, int, bytes, bytes, Sequence[bytes]]] = [
        (old - 1, new, r1, r2, proof),
        (old + 1, new, r1, r2, proof),
        (old ^ 2, new, r1, r2, proof),
        (old, new * 2, r1, r2, proof),
        (old, new // 2, r1, r2, proof),
        (old, new, SOME_HASH, r2, proof),
        (old, new, r1, SOME_HASH, proof),
        (old, new, r2, r1, proof),
        (old, new, r1, r2, []),
        (old, new, r1, r2, [*proof, b""]),
        (old, new, r1, r2, [*proof, r1]),
        (old, new, r1, r2, [*proof, r2]),
        (old, new, r1, r2, [b"", *proof]),
        (old, new, r1, r2, [r1, *proof]),
        (old, new, r1, r2, [r2, *proof]),
        (old, new, r1, r2, [proof[0], *proof]),
        (old, new, r1, r2, proof[:-1]),
    ]
    probes += [
        (old, new, r1, r2, [*proof[:i], flip(proof[i], 0, 16), *proof[i + 1 :]])
        for i in range(len(proof))
    ]
    for s1, s2, a, b, pf in probes:
        with pytest.raises((ConsistencyProofError, InvalidInputError)):
            verify_consistency(s1, s2, a, b, pf)


def test_consistency_edge_cases_are_strict() -> None:
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, CT_ROOTS[5], [])
    verify_consistency(5, 5, CT_ROOTS[5], CT_ROOTS[5], [])
    with pytest.raises(ConsistencyProofError, match="forked"):
        verify_consistency(5, 5, CT_ROOTS[5], CT_ROOTS[4], [])
    with pytest.raises(ConsistencyProofError, match="empty tree"):
        verify_consistency(0, 5, SOME_HASH, CT_ROOTS[5], [])
    for old, new in [(0, 0), (0, 1), (1, 1)]:
        with pytest.raises(ConsistencyProofError, match="must be empty"):
            verify_consistency(old, new, CT_ROOTS[old], CT_ROOTS[old], [EMPTY_ROOT])
    with pytest.raises(ConsistencyProofError, match="is empty"):
        verify_consistency(1, 2, CT_ROOTS[1], CT_ROOTS[2], [])


def test_bad_arguments_are_invalid_input_not_verification_errors() -> None:
    tree = MerkleTree.from_entries(CT_LEAVES)
    calls: list[Callable[[], object]] = [
        lambda: tree.inclusion_proof(8, 8),
        lambda: tree.inclusion_proof(0, 9),
        lambda: tree.inclusion_proof(-1, 8),
        lambda: tree.consistency_proof(5, 4),
        lambda: tree.consistency_proof(2, 9),
        lambda: tree.root(9),
        lambda: verify_inclusion(CT_LEAF_HASHES[0], 8, 8, [], CT_ROOTS[8]),
        lambda: verify_inclusion(CT_LEAF_HASHES[0], 0, 0, [], EMPTY_ROOT),
        lambda: verify_inclusion(b"short", 0, 1, [], CT_ROOTS[1]),
        lambda: verify_consistency(3, 2, CT_ROOTS[3], CT_ROOTS[2], []),
        lambda: verify_consistency(1, 2, b"", CT_ROOTS[2], []),
    ]
    for call in calls:
        with pytest.raises(InvalidInputError) as info:
            call()
        assert not isinstance(info.value, VerificationError)
    with pytest.raises(InvalidInputError, match="leaf index 8 is out of range for tree size 8"):
        tree.inclusion_proof(8, 8)


def test_verification_errors_are_not_value_errors() -> None:
    with pytest.raises(InclusionProofError) as info:
        verify_inclusion(SOME_HASH, 0, 1, [], CT_ROOTS[1])
    assert isinstance(info.value, VerificationError)
    assert not isinstance(info.value, ValueError)


# --- (2) properties for every small tree --------------------------------------------------

MAX_N = 40


def make_entries(n: int, tag: bytes = b"e") -> list[bytes]:
    return [tag + i.to_bytes(2, "big") for i in range(n)]


def reference_mth(leaves: Sequence[bytes]) -> bytes:
    """MTH straight from RFC 9162's recursive definition, over raw entries."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(reference_mth(leaves[:k]), reference_mth(leaves[k:]))


@pytest.fixture(scope="module")
def big_tree() -> MerkleTree:
    return MerkleTree.from_entries(make_entries(MAX_N))


def test_roots_match_the_recursive_definition(big_tree: MerkleTree) -> None:
    entries = make_entries(MAX_N)
    incremental = MerkleTree()
    for n in range(MAX_N + 1):
        assert big_tree.root(n) == reference_mth(entries[:n]) == incremental.root()
        if n < MAX_N:
            incremental.append(entries[n])


def test_every_inclusion_proof_verifies_and_no_tampering_does(big_tree: MerkleTree) -> None:
    for n in range(1, MAX_N + 1):
        root = big_tree.root(n)
        for i in range(n):
            leaf = big_tree.leaf_hash_at(i)
            proof = big_tree.inclusion_proof(i, n)
            verify_inclusion(leaf, i, n, proof, root)
            with pytest.raises(InclusionProofError):
                verify_inclusion(flip(leaf, 5), i, n, proof, root)
            with pytest.raises(InclusionProofError):
                verify_inclusion(leaf, i, n, proof, flip(root, 31))
            for j in range(len(proof)):
                bad = [*proof[:j], flip(proof[j], j % 32), *proof[j + 1 :]]
                with pytest.raises(InclusionProofError):
                    verify_inclusion(leaf, i, n, bad, root)
            with pytest.raises(InclusionProofError, match="too many hashes"):
                verify_inclusion(leaf, i, n, [*proof, SOME_HASH], root)
            if proof:
                with pytest.raises(InclusionProofError, match="missing hashes"):
                    verify_inclusion(leaf, i, n, proof[:-1], root)
            for other in range(n):
                if other != i:  # the same proof does not place the leaf anywhere else
                    with pytest.raises(InclusionProofError):
                        verify_inclusion(leaf, other, n, proof, root)


def test_every_consistency_proof_verifies_and_no_tampering_does(big_tree: MerkleTree) -> None:
    for n in range(1, MAX_N + 1):
        new_root = big_tree.root(n)
        for m in range(1, n):
            old_root = big_tree.root(m)
            proof = big_tree.consistency_proof(m, n)
            verify_consistency(m, n, old_root, new_root, proof)
            for bad_old, bad_new in [
                (flip(old_root, 0), new_root),
                (old_root, flip(new_root, 0)),
                (new_root, old_root),
            ]:
                with pytest.raises(ConsistencyProofError):
                    verify_consistency(m, n, bad_old, bad_new, proof)
            for j in range(len(proof)):
                bad = [*proof[:j], flip(proof[j], j % 32), *proof[j + 1 :]]
                with pytest.raises(ConsistencyProofError):
                    verify_consistency(m, n, old_root, new_root, bad)
            with pytest.raises(ConsistencyProofError, match="too many hashes"):
                verify_consistency(m, n, old_root, new_root, [*proof, SOME_HASH])
            for bad in [proof[:-1], [SOME_HASH, *proof]]:
                with pytest.raises(ConsistencyProofError):
                    verify_consistency(m, n, old_root, new_root, bad)


def test_a_forked_log_cannot_prove_consistency() -> None:
    """Two logs that agree on a prefix and then diverge: no proof bridges the fork."""
    n = 24
    honest = make_entries(n)
    for fork_at in range(n):
        forked = honest[:fork_at] + make_entries(n - fork_at, b"evil")
        a, b = MerkleTree.from_entries(honest), MerkleTree.from_entries(forked)
        for m in range(1, n + 1):
            if m <= fork_at:  # the shared prefix is consistent with both futures
                assert a.root(m) == b.root(m)
                verify_consistency(m, n, a.root(m), b.root(n), b.consistency_proof(m, n))
                continue
            assert a.root(m) != b.root(m)
            for new in range(m, n + 1):
                # The forked log cannot show its tree extends what the honest one published,
                # whichever of the two logs' proofs it offers.
                for proof in [b.consistency_proof(m, new), a.consistency_proof(m, new)]:
                    with pytest.raises(ConsistencyProofError):
                        verify_consistency(m, new, a.root(m), b.root(new), proof)


# --- entries ------------------------------------------------------------------------------


def test_entry_bytes_are_canonical_json() -> None:
    event = {"type": "opt-out", "org": "b", "nested": {"z": 1, "a": [1, 2]}}
    assert entry_bytes(event) == b'{"nested":{"a":[1,2],"z":1},"org":"b","type":"opt-out"}'
    assert parse_entry(entry_bytes(event)) == event


@pytest.mark.parametrize(
    "event",
    [
        {"type": "deleted-everything"},
        {"org": "no type"},
        {"type": "opt-in", "x": (1, 2)},
        {"type": "opt-in", "x": {1: "int key"}},
        {"type": "opt-in", "x": float("nan")},
        {"type": "opt-in", "x": object()},
        ["type", "opt-in"],
    ],
)
def test_entry_bytes_refuses_events_that_are_not_exact_json(event: object) -> None:
    with pytest.raises(EntryError):
        entry_bytes(event)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b'{"org":"b", "type":"opt-out"}', b'{"type":"opt-out","org":"b"}', b"[]", b"\xff", b"{"],
)
def test_parse_entry_refuses_non_canonical_bytes(data: bytes) -> None:
    with pytest.raises(EntryError):
        parse_entry(data)


# --- (3) signed checkpoints ---------------------------------------------------------------

ORIGIN = "consortium.test/log"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def signed(key: ec.EllipticCurvePrivateKey) -> SignedCheckpoint:
    return sign_checkpoint(Checkpoint(ORIGIN, 8, CT_ROOTS[8]), key)


def test_checkpoint_text_is_the_tlog_checkpoint_body() -> None:
    cp = Checkpoint(ORIGIN, 8, CT_ROOTS[8])
    assert cp.to_text() == f"{ORIGIN}\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n"
    assert Checkpoint.from_text(cp.to_text()) == cp


def test_checkpoint_sign_and_verify_round_trips(
    key: ec.EllipticCurvePrivateKey, signed: SignedCheckpoint
) -> None:
    cp = Checkpoint(ORIGIN, 8, CT_ROOTS[8])
    public = key.public_key()
    assert verify_checkpoint(signed, public) == cp
    assert verify_checkpoint(signed, public, origin=ORIGIN) == cp
    text = signed.to_text()
    assert text.startswith(cp.to_text() + "\n\u2014 " + ORIGIN + " ")
    assert SignedCheckpoint.from_text(text) == signed
    assert SignedCheckpoint.from_text(text.encode()) == signed
    assert SignedCheckpoint.from_json(signed.to_json()) == signed
    assert signed.key_id == key_id(public)


def test_checkpoint_from_another_key_fails(signed: SignedCheckpoint) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(CheckpointSignatureError, match="signed by key"):
        verify_checkpoint(signed, other)
    # Claiming the other key's id does not help: the signature is still not its.
    relabelled = SignedCheckpoint(signed.body, key_id(other), signed.signature)
    with pytest.raises(CheckpointSignatureError, match="does not verify"):
        verify_checkpoint(relabelled, other)


def test_checkpoint_of_another_log_fails(
    signed: SignedCheckpoint, key: ec.EllipticCurvePrivateKey
) -> None:
    with pytest.raises(CheckpointSignatureError, match=r"not 'other\.test/log'"):
        verify_checkpoint(signed, key.public_key(), origin="other.test/log")


def test_checkpoint_with_any_flipped_byte_fails(
    key: ec.EllipticCurvePrivateKey, signed: SignedCheckpoint
) -> None:
    public = key.public_key()
    for i in range(len(signed.body)):
        body = flip(signed.body.encode(), i).decode()
        with pytest.raises(CheckpointSignatureError):
            verify_checkpoint(SignedCheckpoint(body, signed.key_id, signed.signature), public)
    for i in range(len(signed.signature)):
        sig = flip(signed.signature, i)
        with pytest.raises(CheckpointSignatureError):
            verify_checkpoint(SignedCheckpoint(signed.body, signed.key_id, sig), public)
    # Every single-bit change of the serialised forms is caught, as a bad signature or as a
    # malformed checkpoint: it never verifies.
    for serialised, parse in [
        (signed.to_text().encode(), SignedCheckpoint.from_text),
        (signed.to_json().encode(), SignedCheckpoint.from_json),
    ]:
        for i in range(len(serialised)):
            with pytest.raises((CheckpointSignatureError, CheckpointFormatError)):
                verify_checkpoint(parse(flip(serialised, i)), public)


@pytest.mark.parametrize(
    "body",
    [
        f"{ORIGIN}\n08\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        f"{ORIGIN}\n-8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        f"{ORIGIN}\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=",
        f"{ORIGIN}\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\nextension\n",
        f"{ORIGIN}\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyh=\n",  # non-canonical
        f"{ORIGIN}\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQw==\n",  # 31 bytes
        "has space\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        "\n8\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        f"{ORIGIN}\n{1 << 64}\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
        f"{ORIGIN}\n{'9' * 5000}\nXcnaeacGWamtVZy3Ad7ZoqudgjqtL0lgz+Nw7/RgQyg=\n",
    ],
)
def test_checkpoint_body_parsing_is_strict(body: str) -> None:
    with pytest.raises(CheckpointFormatError):
        Checkpoint.from_text(body)


def test_only_p256_keys_are_accepted() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(InvalidInputError, match="P-256"):
        sign_checkpoint(Checkpoint(ORIGIN, 0, EMPTY_ROOT), p384)
    pem = p384.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(InvalidInputError, match="P-256"):
        load_public_key(pem)


# --- (4) the file log ---------------------------------------------------------------------


def event(i: int) -> dict[str, object]:
    kinds = ["expert-accepted", "opt-out", "opt-in", "revocation", "assembly-released"]
    return {"type": kinds[i % len(kinds)], "org": f"org-{i}", "seq": i}


def fill(path: Path, n: int) -> bytes:
    with FileLog(path) as log:
        for i in range(n):
            assert log.append(event(i)) == i
        return log.root()


def test_file_log_reopens_with_the_same_root_and_entries(tmp_path: Path) -> None:
    path = tmp_path / "log"
    root = fill(path, 13)
    with FileLog(path) as log:
        assert log.size == 13
        assert log.root() == root
        assert log.truncated_bytes == 0
        assert log.entry(4) == entry_bytes(event(4))
        assert log.entries(2, 5) == [entry_bytes(event(i)) for i in range(2, 5)]
        assert log.entries(13, 13) == []
        assert log.append(event(13)) == 13
    with FileLog(path) as log:
        assert log.size == 14
        assert [parse_entry(e) for e in log.entries(0, 14)] == [event(i) for i in range(14)]


def test_file_log_proofs_equal_the_in_memory_tree(tmp_path: Path) -> None:
    n = 21
    fill(tmp_path / "log", n)
    memory = MerkleTree.from_entries(entry_bytes(event(i)) for i in range(n))
    with FileLog(tmp_path / "log") as log:
        for size in range(n + 1):
            assert log.root(size) == memory.root(size)
            for i in range(size):
                assert log.inclusion_proof(i, size) == memory.inclusion_proof(i, size)
            for old in range(size + 1):
                assert log.consistency_proof(old, size) == memory.consistency_proof(old, size)


def test_a_torn_final_record_is_truncated_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = tmp_path / "full"
    fill(full, 5)
    good_root = MerkleTree.from_entries(entry_bytes(event(i)) for i in range(4)).root()
    data = full.read_bytes()
    last_start = len(data) - (4 + len(entry_bytes(event(4))) + 32)
    for cut in range(last_start + 1, len(data)):  # every partial write of the last record
        torn = tmp_path / f"torn-{cut}"
        torn.write_bytes(data[:cut])
        caplog.clear()
        with caplog.at_level(logging.WARNING), FileLog(torn) as log:
            assert log.size == 4
            assert log.root() == good_root
            assert log.truncated_bytes == cut - last_start
        assert "torn final record" in caplog.text
        assert torn.stat().st_size == last_start
        # The cut bytes are kept as evidence, never destroyed (all-zero ones say nothing).
        kept = tmp_path / f"torn-{cut}.torn-{last_start}"
        if data[last_start:cut].strip(b"\x00"):
            assert kept.read_bytes() == data[last_start:cut]
        else:
            assert not kept.exists()
    # A complete-length final record whose bytes never reached the disk.
    garbled = tmp_path / "garbled"
    garbled.write_bytes(data[:-40] + bytes(40))
    with FileLog(garbled) as log:
        assert (log.size, log.root()) == (4, good_root)
        assert log.append(event(4)) == 4
    assert garbled.read_bytes() == data


def test_a_zero_filled_tail_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "log"
    root = fill(path, 3)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(500))
    with FileLog(path) as log:
        assert (log.size, log.root(), log.truncated_bytes) == (3, root, 500)
    assert path.stat().st_size == size


def test_corruption_before_the_end_is_never_repaired(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fill(path, 4)
    data = path.read_bytes()
    path.write_bytes(flip(data, len(LOG_MAGIC) + 10))  # inside the first entry
    with pytest.raises(LogIntegrityError, match=r"record 0 .* is corrupt"):
        FileLog(path)
    assert path.read_bytes() == flip(data, len(LOG_MAGIC) + 10)  # left for a human


def test_a_corrupt_length_prefix_is_not_mistaken_for_a_torn_tail(tmp_path: Path) -> None:
    """A flipped high bit in a record's length would run past the end of the file: a torn
    append cannot claim more than one record's worth, so the log refuses to open instead of
    cutting away every later entry."""
    path = tmp_path / "log"
    fill(path, 4)
    data = path.read_bytes()
    path.write_bytes(flip(data, len(LOG_MAGIC), 0x80))  # record 0's length prefix, high byte
    with pytest.raises(LogIntegrityError, match="impossible length"):
        FileLog(path)
    assert path.read_bytes() == flip(data, len(LOG_MAGIC), 0x80)


def test_a_tail_longer_than_one_record_is_not_torn(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fill(path, 2)
    with open(path, "ab") as f:
        f.write(b"\x01" * (2 << 20))
    with pytest.raises(LogIntegrityError, match="not a torn last append"):
        FileLog(path)


def test_a_partial_header_is_rewritten_and_a_foreign_file_refused(tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.write_bytes(LOG_MAGIC[:5])
    with FileLog(partial) as log:
        assert log.size == 0
        assert log.root() == EMPTY_ROOT
    assert partial.read_bytes() == LOG_MAGIC
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PK\x03\x04 not a log")
    with pytest.raises(LogFormatError, match="not a flexfed transparency log"):
        FileLog(foreign)


def test_a_rejected_event_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fill(path, 2)
    before = path.read_bytes()
    with open_log(path) as log, pytest.raises(EntryError):
        log.append({"type": "unknown"})
    assert path.read_bytes() == before


def test_a_log_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="directory for the log"):
        FileLog(tmp_path / "nowhere" / "log")


def test_a_log_has_one_writer(tmp_path: Path) -> None:
    with FileLog(tmp_path / "log"), pytest.raises(LogLockedError):
        FileLog(tmp_path / "log")


def test_file_log_checks_its_arguments(tmp_path: Path) -> None:
    fill(tmp_path / "log", 3)
    with FileLog(tmp_path / "log") as log:
        calls: list[Callable[[], object]] = [
            lambda: log.entry(3),
            lambda: log.entries(2, 4),
            lambda: log.entries(2, 1),
            lambda: log.inclusion_proof(3, 3),
            lambda: log.consistency_proof(1, 4),
        ]
        for call in calls:
            with pytest.raises(InvalidInputError):
                call()


def test_file_log_checkpoint_verifies_against_its_proofs(
    tmp_path: Path, key: ec.EllipticCurvePrivateKey
) -> None:
    with FileLog(tmp_path / "log") as log:
        log.append(event(0))
        old = verify_checkpoint(log.checkpoint(ORIGIN, key), key.public_key())
        for i in range(1, 6):
            log.append(event(i))
        new = verify_checkpoint(log.checkpoint(ORIGIN, key), key.public_key())
        proof = log.consistency_proof(old.tree_size, new.tree_size)
        verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, proof)
        inclusion = log.inclusion_proof(3, new.tree_size)
    leaf = leaf_hash(entry_bytes(event(3)))
    verify_inclusion(leaf, 3, new.tree_size, inclusion, new.root_hash)


# --- (5) golden fixtures: what this version wrote must verify forever ---------------------


def test_golden_fixtures_keep_verifying(tmp_path: Path) -> None:
    """Written once by tests/fixtures/translog/regenerate.py; never regenerate them."""
    expected = json.loads((FIXTURES / "expected.json").read_text())
    public = load_public_key((FIXTURES / "log-key.public.pem").read_bytes())
    origin = expected["origin"]

    old = verify_checkpoint(
        SignedCheckpoint.from_text((FIXTURES / "checkpoint-3.txt").read_text()),
        public,
        origin=origin,
    )
    new = verify_checkpoint(
        SignedCheckpoint.from_json((FIXTURES / "checkpoint-6.json").read_text()),
        public,
        origin=origin,
    )
    assert (old.tree_size, new.tree_size) == (3, 6)
    assert old.root_hash.hex() == expected["roots"]["3"]
    assert new.root_hash.hex() == expected["roots"]["6"]

    # An auditor's offline checks, from the stored proofs alone.
    stored_consistency = [bytes.fromhex(x) for x in expected["consistency_3_6"]]
    verify_consistency(3, 6, old.root_hash, new.root_hash, stored_consistency)
    for i, ev in enumerate(expected["events"]):
        proof = [bytes.fromhex(x) for x in expected["inclusion_6"][i]]
        verify_inclusion(leaf_hash(entry_bytes(ev)), i, 6, proof, new.root_hash)

    # The log file still opens, unchanged, and yields the same roots and proofs.
    copy = tmp_path / "log.bin"
    shutil.copyfile(FIXTURES / "log.bin", copy)
    with FileLog(copy) as log:
        assert log.truncated_bytes == 0
        assert log.size == 6
        assert [parse_entry(e) for e in log.entries(0, 6)] == expected["events"]
        assert {str(n): log.root(n).hex() for n in range(7)} == expected["roots"]
        assert log.consistency_proof(3, 6) == stored_consistency
    assert copy.read_bytes() == (FIXTURES / "log.bin").read_bytes()


def test_golden_test_key_is_the_published_one() -> None:
    private = serialization.load_pem_private_key(
        (FIXTURES / "TEST-ONLY-DO-NOT-USE-log-key.private.pem").read_bytes(), password=None
    )
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    public = load_public_key((FIXTURES / "log-key.public.pem").read_bytes())
    assert key_id(private.public_key()) == key_id(public)


def test_errors_carry_the_verification_exit_code() -> None:
    assert issubclass(InclusionProofError, FlexfedError)
    assert InclusionProofError.exit_code == ConsistencyProofError.exit_code == 4
    assert CheckpointSignatureError.exit_code == 4
