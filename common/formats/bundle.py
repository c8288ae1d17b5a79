"""The expert bundle: what a data owner uploads, and nothing more.

One directory:

- ``expert.safetensors``: per layer L, with family-neutral names,
  ``layers.L.gate_proj.weight`` (I, H), ``layers.L.up_proj.weight`` (I, H),
  ``layers.L.down_proj.weight`` (H, I), ``layers.L.router.weight`` (H,) and
  ``layers.L.router.bias`` (1,), all in the anchor's weight dtype;
- ``expert.json``: who trained it, on which anchor and data commitment, how, and on what terms;
- later, ``model.sig`` and ``provenance.intoto.json`` (signing).

:func:`validate_bundle` is the one gate every bundle passes before it is used anywhere. It
checks, in this order, and stops at the first failure with an error of its own kind and a
message that says what to fix:

1. the directory holds only bundle files, each a plain file (no symbolic links, folders or
   devices), and the required ones are there;
2. sizes: no file is larger than its kind allows (the weights: than this anchor's expert);
3. expert.json parses strictly (standard JSON, no duplicate keys, fields, types, formats);
4. family and anchor digest are the anchor's;
5. the safetensors header parses strictly (duplicates, offsets, dtypes, truncation);
6. exactly the expected tensors, with the expected shapes and the anchor's dtype;
7. every value is finite.

Signatures and provenance are checked by the trust layer on top of this. :func:`write_bundle`
validates what it is about to write against the anchor and writes the directory atomically.
"""

from __future__ import annotations

import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexfed.common.errors import (
    AnchorMismatchError,
    BundleError,
    MetadataError,
    MissingFileError,
    NonFiniteTensorError,
    TensorMismatchError,
)
from flexfed.common.formats.anchor import Anchor, ExpertShapes
from flexfed.common.formats.families import PROJECTIONS
from flexfed.common.formats.names import NAME_RULE, ORG_PATTERN
from flexfed.common.formats.safetensors_io import (
    DTYPE_SIZES,
    TORCH_DTYPES,
    TensorInfo,
    all_finite,
    read_header,
    read_tensor,
    save_tensors,
)
from flexfed.common.util.digest import sha256_file
from flexfed.common.util.fs import atomic_directory
from flexfed.common.util.jsonio import StrictJSONError, loads_strict, write_json

EXPERT_WEIGHTS = "expert.safetensors"
EXPERT_META = "expert.json"
SIGNATURE = "model.sig"
PROVENANCE = "provenance.intoto.json"
BUNDLE_FILES = frozenset({EXPERT_WEIGHTS, EXPERT_META, SIGNATURE, PROVENANCE})
EXPERT_FORMAT = "flexfed.expert/v1"
MAX_META_BYTES = 256 * 1024  # expert.json is a few KiB; the training summary must stay short

_HEX64 = re.compile(r"[0-9a-f]{64}")


def expert_key(layer: int, part: str) -> str:
    """Family-neutral tensor name in expert.safetensors (part: ``gate_proj.weight``...)."""
    return f"layers.{layer}.{part}"


def expected_tensors(shapes: ExpertShapes) -> dict[str, tuple[int, ...]]:
    """Exactly the tensors (name -> shape) an expert for these shapes must hold."""
    h, i = shapes.hidden_size, shapes.intermediate_size
    per_proj = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    out: dict[str, tuple[int, ...]] = {}
    for layer in range(shapes.num_layers):
        for proj in PROJECTIONS:
            out[expert_key(layer, f"{proj}.weight")] = per_proj[proj]
        out[expert_key(layer, "router.weight")] = (h,)
        out[expert_key(layer, "router.bias")] = (1,)
    return out


@dataclass(frozen=True)
class ExpertMeta:
    """The contents of expert.json."""

    org: str
    name: str
    family: str
    anchor_digest: str
    shapes: ExpertShapes
    data_commitment: str
    training: dict[str, Any] = field(default_factory=dict)
    license: str = "proprietary; no use without the owner's consent"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EXPERT_FORMAT,
            "org": self.org,
            "name": self.name,
            "family": self.family,
            "anchor_digest": self.anchor_digest,
            "shapes": self.shapes.to_json(),
            "data_commitment": self.data_commitment,
            "training": self.training,
            "license": self.license,
        }

    @classmethod
    def from_json(cls, doc: Any) -> ExpertMeta:
        """Parse expert.json strictly: exact field set, types and formats."""
        if not isinstance(doc, dict):
            raise MetadataError("expert.json must be a JSON object")
        want = {
            "format",
            "org",
            "name",
            "family",
            "anchor_digest",
            "shapes",
            "data_commitment",
            "training",
            "license",
        }
        if set(doc) != want:
            extra, missing = sorted(set(doc) - want), sorted(want - set(doc))
            raise MetadataError(
                "expert.json fields are wrong"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unexpected: {', '.join(extra)}" if extra else "")
            )
        if doc["format"] != EXPERT_FORMAT:
            raise MetadataError(
                f"expert.json format must be {EXPERT_FORMAT!r}, got {doc['format']!r}"
            )
        for key in ("org", "name", "family", "anchor_digest", "data_commitment", "license"):
            if not isinstance(doc[key], str):
                raise MetadataError(f"expert.json field {key!r} must be a string")
        for key in ("org", "name"):
            if not ORG_PATTERN.fullmatch(doc[key]):
                raise MetadataError(f"expert.json {key} {doc[key]!r} must be {NAME_RULE}")
        for key in ("anchor_digest", "data_commitment"):
            if not _HEX64.fullmatch(doc[key]):
                raise MetadataError(f"expert.json {key} must be 64 lowercase hex digits")
        if not isinstance(doc["training"], dict):
            raise MetadataError("expert.json field 'training' must be an object")
        s = doc["shapes"]
        if (
            not isinstance(s, dict)
            or set(s) != {"num_layers", "hidden_size", "intermediate_size", "dtype"}
            or not all(
                isinstance(s[k], int) and not isinstance(s[k], bool) and s[k] > 0
                for k in ("num_layers", "hidden_size", "intermediate_size")
            )
            or not isinstance(s["dtype"], str)
            or s["dtype"] not in TORCH_DTYPES
        ):
            raise MetadataError("expert.json 'shapes' is malformed")
        shapes = ExpertShapes(s["num_layers"], s["hidden_size"], s["intermediate_size"], s["dtype"])
        return cls(
            org=doc["org"],
            name=doc["name"],
            family=doc["family"],
            anchor_digest=doc["anchor_digest"],
            shapes=shapes,
            data_commitment=doc["data_commitment"],
            training=doc["training"],
            license=doc["license"],
        )


def read_expert_meta(path: Path, max_bytes: int = MAX_META_BYTES) -> ExpertMeta:
    """Read expert.json strictly: size limit, standard JSON, no duplicate keys, exact fields.

    Duplicate keys and ``NaN``/``Infinity`` are refused although Python's parser would take
    them: another verifier's parser may read such a file differently, and what was signed
    must mean one thing to everyone.
    """
    if not path.is_file():
        raise MissingFileError(f"{EXPERT_META} not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise MetadataError(f"{EXPERT_META} is {size} bytes; at most {max_bytes} are allowed")
    try:
        doc = loads_strict(path.read_bytes())
    except StrictJSONError as err:
        hint = {
            "duplicate": "; give each field once",
            "constant": "; write numbers or null instead",
        }.get(err.kind, "")
        raise MetadataError(f"{EXPERT_META} {err}{hint}") from err
    except OSError as err:
        raise MetadataError(f"cannot read {path}: {err.strerror or err}") from err
    return ExpertMeta.from_json(doc)


# --- validation: the one gate ---------------------------------------------------------------

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


def max_bundle_bytes(anchor: Anchor) -> int:
    """The largest tar stream a valid expert bundle for ``anchor`` can be: each of its files
    at its limit, plus tar headers and padding."""
    return max_weights_bytes(anchor) + MAX_META_BYTES + 2 * MAX_ATTESTATION_BYTES + 64 * 1024


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


# --- writing -----------------------------------------------------------------------------------


def write_bundle(
    out: Path | str,
    tensors: dict[str, torch.Tensor],
    meta: ExpertMeta,
    anchor: Anchor,
    overwrite: bool = False,
) -> Path:
    """Write an expert bundle atomically; it must pass validation against ``anchor`` first."""
    dtype = TORCH_DTYPES[anchor.shapes.dtype]
    cast = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_tensors(tmp / EXPERT_WEIGHTS, cast, {"format": "pt"})
        write_json(tmp / EXPERT_META, meta.to_json())
        validate_bundle(tmp, anchor)
    return out
