"""The expert bundle: what a data owner uploads, and nothing more.

One directory:

- ``expert.safetensors``: per layer L, with family-neutral names,
  ``layers.L.gate_proj.weight`` (I, H), ``layers.L.up_proj.weight`` (I, H),
  ``layers.L.down_proj.weight`` (H, I), ``layers.L.router.weight`` (H,) and
  ``layers.L.router.bias`` (1,), all in the anchor's weight dtype;
- ``expert.json``: who trained it, on which anchor and data commitment, how, and on what terms;
- later, ``model.sig`` and ``provenance.intoto.json`` (signing).

:func:`write_bundle` validates what it is about to write against the anchor and writes the
directory atomically; :func:`flexfed.common.validation.validate_bundle` is the one gate
through which any bundle passes before it is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexfed.common.anchor import Anchor, ExpertShapes
from flexfed.common.checkpoint import atomic_directory, write_json
from flexfed.common.errors import MetadataError, MissingFileError
from flexfed.common.families import PROJECTIONS
from flexfed.common.safetensors_io import TORCH_DTYPES, save_tensors

EXPERT_WEIGHTS = "expert.safetensors"
EXPERT_META = "expert.json"
SIGNATURE = "model.sig"
PROVENANCE = "provenance.intoto.json"
BUNDLE_FILES = frozenset({EXPERT_WEIGHTS, EXPERT_META, SIGNATURE, PROVENANCE})
EXPERT_FORMAT = "flexfed.expert/v1"
MAX_META_BYTES = 256 * 1024  # expert.json is a few KiB; the training summary must stay short

ORG_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
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
                raise MetadataError(
                    f"expert.json {key} {doc[key]!r} must be 1-64 letters, digits, '.', '_' "
                    "or '-', starting with a letter or digit"
                )
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


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MetadataError(f"{EXPERT_META} has the key {key!r} twice; give each field once")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise MetadataError(
        f"{EXPERT_META} holds {name}, which is not JSON; write numbers or null instead"
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
        doc = json.loads(
            path.read_bytes().decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MetadataError(f"{EXPERT_META} is not valid UTF-8 JSON: {err}") from err
    except RecursionError as err:
        raise MetadataError(f"{EXPERT_META} nests too deeply") from err
    except OSError as err:
        raise MetadataError(f"cannot read {path}: {err.strerror or err}") from err
    return ExpertMeta.from_json(doc)


def write_bundle(
    out: Path | str,
    tensors: dict[str, torch.Tensor],
    meta: ExpertMeta,
    anchor: Anchor,
    overwrite: bool = False,
) -> Path:
    """Write an expert bundle atomically; it must pass validation against ``anchor`` first."""
    from flexfed.common.validation import validate_bundle  # (import cycle)

    dtype = TORCH_DTYPES[anchor.shapes.dtype]
    cast = {name: t.detach().to("cpu", dtype).contiguous() for name, t in tensors.items()}
    out = Path(out)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_tensors(tmp / EXPERT_WEIGHTS, cast, {"format": "pt"})
        write_json(tmp / EXPERT_META, meta.to_json())
        validate_bundle(tmp, anchor)
    return out
