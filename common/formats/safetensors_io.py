"""Strict reading and streaming writing of safetensors files.

The safetensors format is an 8-byte little-endian header length N, N bytes of JSON mapping
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (plus an optional
``__metadata__`` of strings), then the raw little-endian tensor bytes.

Files that come from another party are parsed here *strictly* before any byte of them is used:
duplicate keys, unknown dtypes, sizes that do not match shapes, overlapping, unordered or
non-contiguous offsets, a header that is too large, and truncated or padded files are each
rejected with their own message. Nothing here ever unpickles anything.

Writing is streaming: :func:`write_safetensors` takes the header (names, dtypes, shapes) up
front and a function that copies each tensor's bytes, so a shard of any size is written
with memory bounded by one copy buffer.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from flexfed.common.errors import SafetensorsFormatError
from flexfed.common.util.jsonio import StrictJSONError, loads_strict

# The header of a real checkpoint is well under 1 MiB even for thousands of tensors; anything
# near this bound is an attempt to make the reader allocate.
MAX_HEADER_BYTES = 16 * 1024 * 1024

DTYPE_SIZES: dict[str, int] = {"F32": 4, "F16": 2, "BF16": 2}
"""dtypes allowed in artifacts flexfed accepts (weights only; no ints, no bool, no F64)."""

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
# Config files spell dtypes the torch way.
CONFIG_DTYPES: dict[str, str] = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in one file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(
    path: Path, allowed_dtypes: Iterable[str] = DTYPE_SIZES, max_header: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Parse and check a safetensors header; raise SafetensorsFormatError on any defect."""
    allowed = set(allowed_dtypes)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SafetensorsFormatError(f"{path.name}: truncated (no header length)")
            (n,) = struct.unpack("<Q", prefix)
            if n > max_header:
                raise SafetensorsFormatError(
                    f"{path.name}: header of {n} bytes exceeds the {max_header}-byte limit"
                )
            if 8 + n > size:
                raise SafetensorsFormatError(f"{path.name}: truncated (header runs past the end)")
            raw = f.read(n)
    except OSError as err:
        raise SafetensorsFormatError(f"{path}: cannot read: {err.strerror or err}") from err
    try:
        doc = loads_strict(raw)
    except StrictJSONError as err:
        if err.kind == "duplicate":
            raise SafetensorsFormatError(
                f"{path.name}: duplicate key {err.key!r} in the header"
            ) from err
        if err.kind == "depth":
            # A header of nested brackets would otherwise crash the parser, not be refused.
            raise SafetensorsFormatError(f"{path.name}: header nests too deeply") from err
        raise SafetensorsFormatError(f"{path.name}: header is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise SafetensorsFormatError(f"{path.name}: header is not a JSON object")

    metadata = doc.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsFormatError(f"{path.name}: __metadata__ must map strings to strings")

    data_start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in doc.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise SafetensorsFormatError(f"{path.name}: malformed entry for {name!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in allowed:
            raise SafetensorsFormatError(
                f"{path.name}: tensor {name!r} has dtype {dtype!r}; allowed: {sorted(allowed)}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise SafetensorsFormatError(f"{path.name}: tensor {name!r} has a malformed shape")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise SafetensorsFormatError(f"{path.name}: tensor {name!r} has malformed offsets")
        nbytes = math.prod(shape) * DTYPE_SIZES.get(dtype, 0)
        if offsets[1] - offsets[0] != nbytes:
            raise SafetensorsFormatError(
                f"{path.name}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes "
                f"but its shape and dtype need {nbytes}"
            )
        spans.append((offsets[0], offsets[1], name))
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], nbytes)

    # The data must be one contiguous run, tensor after tensor, with no gaps or overlaps.
    cursor = 0
    for begin, end, name in sorted(spans):
        if begin < cursor:
            raise SafetensorsFormatError(f"{path.name}: tensor {name!r} overlaps another tensor")
        if begin > cursor:
            raise SafetensorsFormatError(f"{path.name}: gap in the data before tensor {name!r}")
        cursor = end
    if data_start + cursor < size:
        raise SafetensorsFormatError(f"{path.name}: {size - data_start - cursor} trailing bytes")
    if data_start + cursor > size:
        raise SafetensorsFormatError(
            f"{path.name}: truncated ({size} bytes, the header promises {data_start + cursor})"
        )
    return SafetensorsHeader(path, tensors, metadata, data_start)


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor (little-endian on every platform)."""
    # NOTE: read straight into the buffer the tensor will own: f.read() + bytearray() would
    # copy every byte twice and hold two copies of the tensor at once.
    buf = bytearray(info.nbytes)
    with open(info.path, "rb") as f:
        f.seek(info.start)
        got = f.readinto(buf)
    if got != info.nbytes:
        raise SafetensorsFormatError(f"{info.path.name}: truncated inside {info.name!r}")
    dtype = TORCH_DTYPES[info.dtype]
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=dtype)
    return flat.reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    # Through uint8 so bf16 (which numpy lacks) round-trips exactly.
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


# --- writing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutTensor:
    """One tensor of a file to write: its header entry and the pieces its bytes come from.

    ``pieces`` are (source file, absolute offset, length) byte ranges, concatenated in order;
    ``data`` is used instead when the bytes are already in memory (small tensors only).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[Path, int, int], ...] = ()
    data: bytes | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def build_header(tensors: Sequence[OutTensor], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


_COPY_CHUNK = 8 * 1024 * 1024


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, length: int) -> None:
    """Copy a byte range between open files; in-kernel where the OS allows it."""
    dst.flush()
    remaining = length
    offset = start
    try:
        while remaining > 0:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), remaining, offset)
            if sent == 0:
                break
            offset += sent
            remaining -= sent
        dst.seek(0, os.SEEK_END)
    except (AttributeError, OSError):
        pass
    src.seek(offset)
    while remaining > 0:
        chunk = src.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise SafetensorsFormatError(f"{src.name}: ended {remaining} bytes early")
        dst.write(chunk)
        remaining -= len(chunk)


def write_safetensors(
    path: Path,
    tensors: Sequence[OutTensor],
    metadata: dict[str, str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
) -> None:
    """Write a safetensors file, streaming each tensor's bytes from its sources."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise SafetensorsFormatError(f"{path.name}: duplicate tensor names in the output")
    open_files: dict[Path, BinaryIO] = {}
    try:
        with open(path, "wb") as out:
            out.write(build_header(tensors, metadata))
            for t in tensors:
                if t.data is not None:
                    if len(t.data) != t.nbytes:
                        raise SafetensorsFormatError(f"{t.name}: byte length does not match shape")
                    out.write(t.data)
                else:
                    if sum(n for _, _, n in t.pieces) != t.nbytes:
                        raise SafetensorsFormatError(f"{t.name}: pieces do not match its shape")
                    for src_path, start, length in t.pieces:
                        src = open_files.get(src_path)
                        if src is None:
                            src = open_files[src_path] = open(src_path, "rb")  # noqa: SIM115
                        _copy_range(src, out, start, length)
                if on_bytes is not None:
                    on_bytes(t.nbytes)
            out.flush()
            os.fsync(out.fileno())
    finally:
        for f in open_files.values():
            f.close()


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write in-memory tensors (small files: expert bundles, router vectors)."""
    out = []
    for name, t in tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise SafetensorsFormatError(f"{name}: dtype {t.dtype} cannot be stored")
        out.append(OutTensor(name, DTYPE_NAMES[t.dtype], tuple(t.shape), data=tensor_bytes(t)))
    write_safetensors(path, out, metadata)


def load_tensors(
    path: Path, allowed_dtypes: Iterable[str] = DTYPE_SIZES
) -> dict[str, torch.Tensor]:
    """Strictly parse a file and read all of its tensors."""
    header = read_header(path, allowed_dtypes)
    return {name: read_tensor(info) for name, info in header.tensors.items()}


def all_finite(t: torch.Tensor) -> bool:
    """True if no value is NaN or infinite (an empty tensor is finite)."""
    if not t.numel():
        return True
    if not t.is_floating_point():
        return bool(torch.isfinite(t).all())
    # NOTE: one pass and no temporary: aminmax propagates NaN (documented), and +-inf is
    # the min or the max if present. isfinite().all() builds a bool tensor of the same
    # numel first and is ~25x slower on CPU; it dominated bundle validation.
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


__all__ = [
    "DTYPE_SIZES",
    "MAX_HEADER_BYTES",
    "OutTensor",
    "SafetensorsHeader",
    "TensorInfo",
    "all_finite",
    "load_tensors",
    "read_header",
    "read_tensor",
    "save_tensors",
    "tensor_bytes",
    "write_safetensors",
]
