"""The one gate every expert bundle passes before it is used anywhere.

:func:`validate_bundle` checks, in this order, and stops at the first failure with an error
of its own kind and a message that says what to fix:

1. the directory holds only bundle files, and the required ones are there;
2. sizes: expert.json and the weights are no larger than the anchor allows;
3. expert.json parses strictly (fields, types, formats);
4. family and anchor digest are the anchor's;
5. the safetensors header parses strictly (duplicates, offsets, dtypes, truncation);
6. exactly the expected tensors, with the expected shapes and the anchor's dtype;
7. every value is finite.

Signatures and provenance are checked by the signing layer on top of this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flexfed.common.anchor import Anchor
from flexfed.common.bundle import (
    BUNDLE_FILES,
    EXPERT_META,
    EXPERT_WEIGHTS,
    ExpertMeta,
    expected_tensors,
)
from flexfed.common.checkpoint import read_json
from flexfed.common.digest import sha256_file
from flexfed.common.errors import (
    AnchorMismatchError,
    BundleError,
    MissingFileError,
    NonFiniteTensorError,
    TensorMismatchError,
)
from flexfed.common.safetensors_io import (
    DTYPE_SIZES,
    TensorInfo,
    all_finite,
    read_header,
    read_tensor,
)

MAX_META_BYTES = 256 * 1024
MAX_HEADER_BYTES = 1024 * 1024  # an expert header is a few KiB even for 100 layers


@dataclass(frozen=True)
class ExpertBundle:
    """A bundle that passed validation against an anchor."""

    path: Path
    meta: ExpertMeta
    tensors: dict[str, TensorInfo]
    weights_sha256: str
    meta_sha256: str

    @property
    def org(self) -> str:
        return self.meta.org

    def info(self, layer: int, part: str) -> TensorInfo:
        return self.tensors[f"layers.{layer}.{part}"]


def max_weights_bytes(anchor: Anchor) -> int:
    """The exact data size of a valid expert, plus the largest header we accept."""
    item = DTYPE_SIZES[anchor.shapes.dtype]
    data = sum(
        item * _numel(shape) for shape in expected_tensors(anchor.shapes).values()
    )
    return data + 8 + MAX_HEADER_BYTES


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def validate_bundle(path: Path | str, anchor: Anchor, check_values: bool = True) -> ExpertBundle:
    """Validate an expert bundle directory against an anchor; return what was validated."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"expert bundle not found: {path} is not a directory")
    present = {p.name for p in path.iterdir()}
    unexpected = sorted(present - BUNDLE_FILES)
    if unexpected:
        raise BundleError(
            f"{path}: unexpected files in an expert bundle: {', '.join(unexpected)} "
            f"(allowed: {', '.join(sorted(BUNDLE_FILES))})"
        )
    for name in (EXPERT_META, EXPERT_WEIGHTS):
        p = path / name
        if not p.is_file() or p.is_symlink():
            raise MissingFileError(f"{path}: {name} is missing (or not a plain file)")

    # --- sizes before parsing anything
    limit = max_weights_bytes(anchor)
    size = (path / EXPERT_WEIGHTS).stat().st_size
    if size > limit:
        raise BundleError(f"{EXPERT_WEIGHTS} is {size} bytes; an expert for this anchor is at most {limit}")

    # --- expert.json
    meta = ExpertMeta.from_json(read_json(path / EXPERT_META, EXPERT_META, MAX_META_BYTES))
    if meta.family != anchor.family.dense_model_type:
        raise AnchorMismatchError(
            f"expert family {meta.family!r} does not match the anchor's "
            f"{anchor.family.dense_model_type!r}"
        )
    if meta.anchor_digest != anchor.digest:
        raise AnchorMismatchError(
            f"expert was trained on anchor {meta.anchor_digest[:16]}..., not this anchor "
            f"({anchor.digest[:16]}...); retrain it on the consortium's current anchor"
        )
    if meta.shapes != anchor.shapes:
        raise AnchorMismatchError(
            f"expert.json shapes {meta.shapes.to_json()} differ from the anchor's "
            f"{anchor.shapes.to_json()}"
        )

    # --- weights header, keys, shapes, dtypes
    header = read_header(path / EXPERT_WEIGHTS, max_header=MAX_HEADER_BYTES)
    expected = expected_tensors(anchor.shapes)
    missing = sorted(set(expected) - set(header.tensors))
    extra = sorted(set(header.tensors) - set(expected))
    if missing:
        raise TensorMismatchError(
            f"{EXPERT_WEIGHTS} lacks {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}"
        )
    if extra:
        raise TensorMismatchError(
            f"{EXPERT_WEIGHTS} has {len(extra)} unexpected tensor(s), e.g. {', '.join(extra[:3])}"
        )
    for name, shape in expected.items():
        info = header.tensors[name]
        if info.shape != shape:
            raise TensorMismatchError(
                f"{name} has shape {list(info.shape)}; this anchor needs {list(shape)}"
            )
        if info.dtype != anchor.shapes.dtype:
            raise TensorMismatchError(
                f"{name} is {info.dtype}; this anchor's weights are {anchor.shapes.dtype}"
            )

    # --- values
    if check_values:
        for name in expected:
            if not all_finite(read_tensor(header.tensors[name])):
                raise NonFiniteTensorError(f"{name} holds NaN or infinite values")

    return ExpertBundle(
        path=path,
        meta=meta,
        tensors=header.tensors,
        weights_sha256=sha256_file(path / EXPERT_WEIGHTS),
        meta_sha256=sha256_file(path / EXPERT_META),
    )
