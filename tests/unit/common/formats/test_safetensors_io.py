"""Our safetensors reader and writer agree with the reference library, byte for byte.

The streaming writer's files load with ``safetensors.torch.load_file`` exactly (every dtype we
allow, tensors stitched from byte ranges of other files, with and without the in-kernel copy);
the strict reader reads what ``safetensors.torch.save_file`` writes; and ``read_header``
refuses each defect of a hand-written file with a :class:`SafetensorsFormatError` that names it.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexfed.common.errors import SafetensorsFormatError
from flexfed.common.formats.safetensors_io import (
    DTYPE_NAMES,
    OutTensor,
    load_tensors,
    read_header,
    read_tensor,
    save_tensors,
    tensor_bytes,
    write_safetensors,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bits, not just equal values (-0.0, NaN payloads and subnormals included)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))


def sample_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors of awkward shapes and values: a scalar, an empty one, specials, 3-D."""
    g = torch.Generator().manual_seed(seed)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 65504.0])
    return {
        "layers.0.weight": torch.randn(5, 7, generator=g).to(dtype),
        "layers.10.weight": torch.randn(3, 4, 2, generator=g).to(dtype),
        "layers.2.bias": torch.randn(7, generator=g).to(dtype),
        "scalar": torch.tensor(1.5, dtype=dtype),
        "empty": torch.empty(0, 3, dtype=dtype),
        "specials": specials.to(dtype),
    }


# --- our writer, their reader ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_written_file_loads_identically_in_safetensors(dtype: torch.dtype, tmp_path: Path) -> None:
    tensors = sample_tensors(dtype)
    save_tensors(tmp_path / "ours.safetensors", tensors, {"format": "pt", "note": "ü"})

    theirs = load_file(tmp_path / "ours.safetensors")
    assert set(theirs) == set(tensors)
    ours = load_tensors(tmp_path / "ours.safetensors")  # and our strict reader agrees
    for name, t in tensors.items():
        assert_bit_equal(theirs[name], t)
        assert_bit_equal(ours[name], t)
    with safe_open(tmp_path / "ours.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "ü"}


@pytest.mark.parametrize("in_kernel", [True, False], ids=["copy_file_range", "read-write"])
def test_tensors_from_byte_ranges_load_identically(
    in_kernel: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of two files stitched into new tensors: what assembly does to router matrices."""
    g = torch.Generator().manual_seed(1)
    src_a = {"w": torch.randn(4, 6, generator=g), "v": torch.randn(6, generator=g).half()}
    src_b = {"r": torch.randn(3, 6, generator=g), "big": torch.randn(1 << 21, generator=g)}
    save_file(src_a, tmp_path / "a.safetensors")
    save_file(src_b, tmp_path / "b.safetensors")
    a = read_header(tmp_path / "a.safetensors").tensors
    b = read_header(tmp_path / "b.safetensors").tensors
    row = 6 * 4  # bytes in one F32 row of six

    if not in_kernel:
        real = os.copy_file_range
        calls = {"n": 0}

        def flaky(src: int, dst: int, count: int, offset_src: int | None = None) -> int:
            # The kernel copies a little once, then refuses (as across some filesystems):
            # the plain copy must carry on from exactly where it stopped.
            calls["n"] += 1
            if calls["n"] == 1:
                return real(src, dst, min(count, 10), offset_src)
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", flaky)

    router = (
        (a["w"].path, a["w"].start + 2 * row, row),  # row 2 of a.w
        (b["r"].path, b["r"].start, 3 * row),  # all of b.r
        (a["w"].path, a["w"].start, row),  # row 0 of a.w
    )
    out = [
        OutTensor("router", "F32", (5, 6), pieces=router),
        OutTensor("v", "F16", (6,), pieces=((a["v"].path, a["v"].start, a["v"].nbytes),)),
        OutTensor("inline", "BF16", (2,), data=tensor_bytes(torch.ones(2, dtype=torch.bfloat16))),
        OutTensor("big", "F32", (1 << 21,), pieces=((b["big"].path, b["big"].start, 1 << 23),)),
    ]
    written: list[int] = []
    write_safetensors(tmp_path / "out.safetensors", out, {"format": "pt"}, written.append)

    theirs = load_file(tmp_path / "out.safetensors")
    want = torch.cat([src_a["w"][2:3], src_b["r"], src_a["w"][0:1]])
    assert_bit_equal(theirs["router"], want)
    assert_bit_equal(theirs["v"], src_a["v"])
    assert_bit_equal(theirs["inline"], torch.ones(2, dtype=torch.bfloat16))
    assert_bit_equal(theirs["big"], src_b["big"])
    assert written == [t.nbytes for t in out]
    if not in_kernel:
        assert calls["n"] >= 2


def test_writer_refuses_inconsistent_tensors(tmp_path: Path) -> None:
    one = tensor_bytes(torch.ones(2))
    src = tmp_path / "src.bin"
    src.write_bytes(b"\0" * 8)
    bad = {
        "duplicate tensor names": [OutTensor("x", "F32", (2,), data=one)] * 2,
        "byte length does not match shape": [OutTensor("x", "F32", (3,), data=one)],
        "pieces do not match its shape": [OutTensor("x", "F32", (3,), pieces=((src, 0, 8),))],
        "src.bin: ended 8 bytes early": [OutTensor("x", "F32", (3,), pieces=((src, 4, 12),))],
    }
    for message, tensors in bad.items():
        with pytest.raises(SafetensorsFormatError, match=message):
            write_safetensors(tmp_path / "out.safetensors", tensors)


# --- their writer, our reader ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_NAMES[d])
def test_strict_reader_reads_reference_files(dtype: torch.dtype, tmp_path: Path) -> None:
    tensors = sample_tensors(dtype, seed=2)
    tensors["mixed.f32"] = torch.arange(3, dtype=torch.float32)  # another dtype in the file
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})

    header = read_header(tmp_path / "ref.safetensors")
    assert header.metadata == {"format": "pt"}
    assert set(header.tensors) == set(tensors)
    for name, info in header.tensors.items():
        assert info.shape == tuple(tensors[name].shape)
        assert info.dtype == DTYPE_NAMES[tensors[name].dtype]
    for name, t in load_tensors(tmp_path / "ref.safetensors").items():
        assert_bit_equal(t, tensors[name])


def test_strict_reader_refuses_reference_files_of_disallowed_dtypes(tmp_path: Path) -> None:
    save_file({"step": torch.tensor([3], dtype=torch.int64)}, tmp_path / "ints.safetensors")
    with pytest.raises(SafetensorsFormatError, match="'step' has dtype 'I64'"):
        read_header(tmp_path / "ints.safetensors")
    save_file({"w": torch.ones(2, dtype=torch.float16)}, tmp_path / "half.safetensors")
    with pytest.raises(SafetensorsFormatError, match=r"dtype 'F16'; allowed: \['F32'\]"):
        read_header(tmp_path / "half.safetensors", allowed_dtypes=["F32"])


def test_read_tensor_notices_a_file_cut_after_its_header_was_read(tmp_path: Path) -> None:
    save_file({"w": torch.ones(4, 4)}, tmp_path / "w.safetensors")
    info = read_header(tmp_path / "w.safetensors").tensors["w"]
    with open(tmp_path / "w.safetensors", "r+b") as f:
        f.truncate(info.start + 10)
    with pytest.raises(SafetensorsFormatError, match="truncated inside 'w'"):
        read_tensor(info)


# --- read_header: one defect at a time -------------------------------------------------------

ENTRY_A = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
ENTRY_B = {"dtype": "F16", "shape": [4], "data_offsets": [16, 24]}
DATA = bytes(range(24))


def file_bytes(
    header: dict[str, Any] | str | bytes, data: bytes = DATA, n: int | None = None
) -> bytes:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def with_entry(name: str, **fields: Any) -> dict[str, Any]:
    """The valid two-tensor header with fields of one entry replaced."""
    header: dict[str, Any] = {"a": dict(ENTRY_A), "b": dict(ENTRY_B)}
    header[name].update(fields)
    return header


VALID = {"a": ENTRY_A, "b": ENTRY_B}
A, B = json.dumps(ENTRY_A), json.dumps(ENTRY_B)
DUPLICATE = f'{{"a": {A}, "b": {B}, "a": {A}}}'  # Python's json would keep the second "a"
NESTED_DUPLICATE = (
    '{"a": {"dtype": "F32", "dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}'
)

DEFECTS: list[tuple[str, bytes, str]] = [
    ("empty-file", b"", r"truncated \(no header length\)"),
    ("short-length-field", b"\x10\0\0\0", r"truncated \(no header length\)"),
    ("header-past-the-end", file_bytes(VALID, b"")[:30], r"header runs past the end"),
    ("header-length-huge", file_bytes(VALID, n=2**63), r"header of \d+ bytes exceeds"),
    ("empty-header", file_bytes(b"", b""), r"header is not valid JSON"),
    ("header-not-json", file_bytes("{'a': 1}"), r"header is not valid JSON"),
    ("header-not-utf8", file_bytes(b'{"\xff": 1}'), r"header is not valid JSON"),
    ("header-not-object", file_bytes('["a", "b"]'), r"header is not a JSON object"),
    ("header-nested-too-deep", file_bytes("[" * 50_000, b""), r"header nests too deeply"),
    ("duplicate-tensor", file_bytes(DUPLICATE), r"duplicate key 'a' in the header"),
    ("duplicate-field", file_bytes(NESTED_DUPLICATE, DATA[:16]), r"duplicate key 'dtype'"),
    ("metadata-not-strings", file_bytes({"__metadata__": {"n": 1}, **VALID}), r"__metadata__"),
    ("metadata-not-object", file_bytes({"__metadata__": ["x"], **VALID}), r"__metadata__"),
    ("entry-not-object", file_bytes({"a": [0, 16], "b": ENTRY_B}), r"malformed entry for 'a'"),
    ("entry-extra-field", file_bytes(with_entry("a", crc=0)), r"malformed entry for 'a'"),
    ("dtype-i64", file_bytes(with_entry("b", dtype="I64", shape=[1])), r"'b' has dtype 'I64'"),
    ("dtype-f64", file_bytes(with_entry("a", dtype="F64", shape=[2])), r"'a' has dtype 'F64'"),
    ("dtype-bool", file_bytes(with_entry("b", dtype="BOOL", shape=[8])), r"dtype 'BOOL'"),
    ("dtype-not-a-string", file_bytes(with_entry("a", dtype=None)), r"'a' has dtype None"),
    ("dtype-unhashable", file_bytes(with_entry("a", dtype={"x": 1})), r"'a' has dtype \{"),
    ("shape-not-a-list", file_bytes(with_entry("a", shape=4)), r"'a' has a malformed shape"),
    ("shape-negative", file_bytes(with_entry("a", shape=[-2, -2])), r"'a' has a malformed shape"),
    ("shape-float", file_bytes(with_entry("a", shape=[2.0, 2])), r"'a' has a malformed shape"),
    ("shape-bool", file_bytes(with_entry("b", shape=[True] * 4)), r"'b' has a malformed shape"),
    ("offsets-three", file_bytes(with_entry("a", data_offsets=[0, 8, 16])), r"malformed offsets"),
    ("offsets-reversed", file_bytes(with_entry("a", data_offsets=[16, 0])), r"malformed offsets"),
    ("offsets-negative", file_bytes(with_entry("a", data_offsets=[-4, 12])), r"malformed offsets"),
    ("offsets-float", file_bytes(with_entry("a", data_offsets=[0.0, 16])), r"malformed offsets"),
    ("size-mismatch", file_bytes(with_entry("a", shape=[2, 3])), r"spans 16 bytes but .* need 24"),
    ("overlap", file_bytes(with_entry("b", data_offsets=[12, 20])), r"'b' overlaps another"),
    ("aliased", file_bytes(with_entry("b", shape=[8], data_offsets=[0, 16])), r"overlaps"),
    (
        "gap-at-start",
        file_bytes({"b": {**ENTRY_B, "data_offsets": [8, 16]}}, DATA[:16]),
        r"gap in the data before tensor 'b'",
    ),
    ("gap-between", file_bytes(with_entry("b", data_offsets=[20, 28]), DATA + b"\0" * 4), r"gap"),
    ("trailing-bytes", file_bytes(VALID, DATA + b"\0"), r"1 trailing bytes"),
    ("truncated-data", file_bytes(VALID, DATA[:-1]), r"truncated \(\d+ bytes, the header promises"),
]


def test_the_defect_base_is_valid(tmp_path: Path) -> None:
    """The header every defect starts from is read correctly, offsets in any key order."""
    path = tmp_path / "ok.safetensors"
    path.write_bytes(file_bytes({"b": ENTRY_B, "a": ENTRY_A}))
    header = read_header(path)
    assert header.tensors["a"].start == header.data_start
    assert read_tensor(header.tensors["b"]).dtype == torch.float16
    # Header padding with spaces (as safetensors aligns data to 8 bytes) is fine.
    path.write_bytes(file_bytes(json.dumps(VALID) + "   "))
    assert set(read_header(path).tensors) == {"a", "b"}


@pytest.mark.parametrize(("raw", "message"), [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_read_header_refuses(raw: bytes, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    with pytest.raises(SafetensorsFormatError, match=message) as info:
        read_header(path, max_header=1024 * 1024)
    assert str(info.value).startswith("bad.safetensors: ")


def test_read_header_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsFormatError, match="cannot read"):
        read_header(tmp_path / "absent.safetensors")
