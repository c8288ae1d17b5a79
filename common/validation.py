"""The one gate every expert bundle passes before it is used anywhere.

:func:`validate_bundle` checks, in this order, and stops at the first failure with an error
of its own kind and a message that says what to fix:

1. the directory holds only bundle files, each a plain file (no symbolic links, folders or
   devices), and the required ones are there;
2. sizes: no file is larger than its kind allows (the weights: than this anchor's expert);
3. expert.json parses strictly (standard JSON, no duplicate keys, fields, types, formats);
4. family and anchor digest are the anchor's;
5. the safetensors header parses strictly (duplicates, offsets, dtypes, truncation);
6. exactly the expected tensors, with the expected shapes and the anchor's dtype;
7. every value is finite.

Signatures and provenance are checked by the signing layer on top of this.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from flexfed.common.anchor import Anchor
from flexfed.common.bundle import (
    BUNDLE_FILES,
    EXPERT_META,
    EXPERT_WEIGHTS,
    MAX_META_BYTES,
    PROVENANCE,
    SIGNATURE,
    ExpertMeta,
    expected_tensors,
    read_expert_meta,
)
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

# A signature bundle (certificate chain included) or an in-toto statement is a few KiB; both
# are copied into every assembled model, so they must stay small.
MAX_ATTESTATION_BYTES = 1024 * 1024
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
    data = sum(item * _numel(shape) for shape in expected_tensors(anchor.shapes).values())
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
    # Every file is read (and the attestations copied into assembled models) by name, so a
    # link could smuggle in bytes from anywhere on the coordinator's disk.
    sizes: dict[str, int] = {}
    for name in sorted(present):
        st = (path / name).lstat()
        if stat.S_ISLNK(st.st_mode):
            raise BundleError(
                f"{path}: {name} is a symbolic link; a bundle must hold plain files "
                "(copy the file in instead of linking it)"
            )
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path}: {name} is not a plain file")
        sizes[name] = st.st_size
    for name in (EXPERT_META, EXPERT_WEIGHTS):
        if name not in present:
            raise MissingFileError(
                f"{path}: {name} is missing; a bundle needs {EXPERT_META} and {EXPERT_WEIGHTS}"
            )

    # --- sizes before parsing anything
    limits = {
        EXPERT_WEIGHTS: max_weights_bytes(anchor),
        EXPERT_META: MAX_META_BYTES,
        SIGNATURE: MAX_ATTESTATION_BYTES,
        PROVENANCE: MAX_ATTESTATION_BYTES,
    }
    for name, size in sizes.items():
        if size > limits[name]:
            what = "an expert for this anchor" if name == EXPERT_WEIGHTS else f"a valid {name}"
            raise BundleError(f"{name} is {size} bytes; {what} is at most {limits[name]}")

    # --- expert.json
    meta = read_expert_meta(path / EXPERT_META)
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
            t = read_tensor(header.tensors[name])
            if not all_finite(t):
                nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise NonFiniteTensorError(
                    f"{name} holds {nan} NaN and {inf} infinite value(s); training diverged: "
                    "retrain (e.g. with a lower learning rate) before submitting"
                )
            del t  # never hold two tensors at once: peak memory = the largest tensor

    return ExpertBundle(
        path=path,
        meta=meta,
        tensors=header.tensors,
        weights_sha256=sha256_file(path / EXPERT_WEIGHTS),
        meta_sha256=sha256_file(path / EXPERT_META),
    )
