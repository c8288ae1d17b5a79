"""The anchor: the frozen public model every expert is trained against.

An anchor is a Hugging Face checkpoint directory of a supported dense family plus:

- ``anchor.json``: the family, the shapes an expert must have, and how r_pub was computed;
- ``router_pub.safetensors``: r_pub for every layer (``layers.L.router.weight``, shape [H]),
  in the dtype of the model's weights.

Its identity is its digest: the model-signing "files" root digest of the whole directory, so
r_pub is part of what every expert commits to.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from flexfed.common.errors import InvalidInputError, MetadataError, UnsupportedModelError
from flexfed.common.formats.checkpoint import Checkpoint, read_json
from flexfed.common.formats.families import PROJECTIONS, ModelFamily, family_of_config
from flexfed.common.formats.safetensors_io import (
    TORCH_DTYPES,
    TensorInfo,
    read_header,
    read_tensor,
    save_tensors,
)
from flexfed.common.util.digest import directory_digest
from flexfed.common.util.fs import atomic_directory
from flexfed.common.util.jsonio import write_json

ANCHOR_FILE = "anchor.json"
ROUTER_FILE = "router_pub.safetensors"
ANCHOR_FORMAT = "flexfed.anchor/v1"
PROJECTION_FILE = "router_projection.safetensors"  # the external embedder's map, if any
PROJECTION_KEY = "projection"


def router_key(layer: int) -> str:
    return f"layers.{layer}.router.weight"


@dataclass(frozen=True)
class ExpertShapes:
    """What every expert of an anchor must look like."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    dtype: str  # safetensors dtype name: F32, F16 or BF16

    def to_json(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "dtype": self.dtype,
        }

    @classmethod
    def of_checkpoint(cls, ckpt: Checkpoint, family: ModelFamily) -> ExpertShapes:
        """Read the FFN shapes off a dense checkpoint, checking every layer agrees."""
        cfg = ckpt.config
        try:
            n, h, i = (
                int(cfg[k]) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")
            )
        except (KeyError, TypeError, ValueError) as err:
            raise UnsupportedModelError(f"{ckpt.path}/config.json lacks {err}") from err
        want = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        dtypes = set()
        for layer in range(n):
            for proj in PROJECTIONS:
                info = ckpt.info(family.dense_ffn_key(layer, proj))
                if info.shape != want[proj]:
                    raise UnsupportedModelError(
                        f"{info.name} has shape {list(info.shape)}, config says {list(want[proj])}"
                    )
                dtypes.add(info.dtype)
        if len(dtypes) != 1:
            raise UnsupportedModelError(f"FFN weights mix dtypes {sorted(dtypes)}")
        return cls(n, h, i, dtypes.pop())


@dataclass(frozen=True)
class Anchor:
    """An opened anchor directory (nothing loaded but headers and metadata)."""

    checkpoint: Checkpoint
    family: ModelFamily
    shapes: ExpertShapes
    meta: dict[str, Any]
    router: dict[str, TensorInfo]

    @property
    def path(self) -> Path:
        return self.checkpoint.path

    @cached_property
    def digest(self) -> str:
        """Hex model-signing root digest of the anchor directory."""
        return directory_digest(self.path)

    def r_pub(self, layer: int) -> torch.Tensor:
        return read_tensor(self.router[router_key(layer)])

    def r_pub_info(self, layer: int) -> TensorInfo:
        return self.router[router_key(layer)]

    def projection(self) -> torch.Tensor:
        """The external embedder's published map to the hidden size, (H, d_embed)."""
        name = (self.meta.get("embedder") or {}).get("projection_file")
        if not isinstance(name, str) or "/" in name or not (self.path / name).is_file():
            raise MetadataError(
                f"anchor {self.path} publishes no embedder projection; it was made with "
                f"router embeddings of kind {self.meta.get('embedder', {}).get('kind')!r}, "
                "so use --router-init hidden-states"
            )
        header = read_header(self.path / name)
        if PROJECTION_KEY not in header.tensors:
            raise MetadataError(f"{name} has no {PROJECTION_KEY!r} tensor")
        return read_tensor(header.tensors[PROJECTION_KEY])


def open_anchor(path: Path | str) -> Anchor:
    """Open and check an anchor directory."""
    path = Path(path)
    ckpt = Checkpoint.open(path)
    family, is_moe = family_of_config(ckpt.config)
    if is_moe:
        raise UnsupportedModelError(f"{path} is an assembled MoE model, not a dense public model")
    family.check_dense_config(ckpt.config)
    if not (path / ANCHOR_FILE).is_file():
        raise MetadataError(
            f"{path} is a {family.dense_model_type} checkpoint but not an anchor (no "
            f"{ANCHOR_FILE}); make one with `flexfed anchor create --public {path} --out DIR`"
        )
    meta = read_json(path / ANCHOR_FILE, ANCHOR_FILE)
    shapes = ExpertShapes.of_checkpoint(ckpt, family)
    if meta.get("format") != ANCHOR_FORMAT:
        raise MetadataError(f"{ANCHOR_FILE}: format must be {ANCHOR_FORMAT!r}")
    if meta.get("family") != family.dense_model_type:
        raise MetadataError(
            f"{ANCHOR_FILE} says family {meta.get('family')!r}, config.json disagrees"
        )
    if meta.get("shapes") != shapes.to_json():
        raise MetadataError(f"{ANCHOR_FILE} shapes {meta.get('shapes')} do not match the weights")
    router = read_header(path / ROUTER_FILE).tensors
    expected = {router_key(layer) for layer in range(shapes.num_layers)}
    if set(router) != expected:
        raise MetadataError(f"{ROUTER_FILE} must hold exactly {len(expected)} router vectors")
    for info in router.values():
        if info.shape != (shapes.hidden_size,) or info.dtype != shapes.dtype:
            raise MetadataError(
                f"{ROUTER_FILE}: {info.name} is {info.dtype}{list(info.shape)}, "
                f"expected {shapes.dtype}[{shapes.hidden_size}]"
            )
    return Anchor(ckpt, family, shapes, meta, router)


def create_anchor(
    public_dir: Path | str,
    out: Path | str,
    r_pub: Sequence[torch.Tensor],
    embedder: dict[str, Any],
    projection: torch.Tensor | None = None,
) -> Anchor:
    """Copy a dense public checkpoint to ``out`` and make it an anchor with the given r_pub.

    ``r_pub`` holds one vector of the hidden size per layer; ``embedder`` records how it was
    computed (e.g. ``{"kind": "hidden-states", "documents": 1000}``). ``projection`` is the
    external embedder's map to the hidden size, published so every owner uses the same one.
    """
    ckpt = Checkpoint.open(public_dir)
    family, is_moe = family_of_config(ckpt.config)
    if is_moe:
        raise UnsupportedModelError(f"{public_dir} is an MoE model; an anchor must be dense")
    family.check_dense_config(ckpt.config)
    shapes = ExpertShapes.of_checkpoint(ckpt, family)
    if len(r_pub) != shapes.num_layers:
        raise InvalidInputError(f"need {shapes.num_layers} r_pub vectors, got {len(r_pub)}")
    dtype = TORCH_DTYPES[shapes.dtype]
    vectors = {}
    for layer, vec in enumerate(r_pub):
        if tuple(vec.shape) != (shapes.hidden_size,):
            raise InvalidInputError(f"r_pub[{layer}] has shape {list(vec.shape)}")
        if not torch.isfinite(vec).all():
            raise InvalidInputError(f"r_pub[{layer}] is not finite")
        vectors[router_key(layer)] = vec.detach().to("cpu", dtype).contiguous()
    with atomic_directory(Path(out)) as tmp:
        for src in sorted(Path(public_dir).iterdir()):
            if src.is_file() and src.name not in {ANCHOR_FILE, ROUTER_FILE, PROJECTION_FILE}:
                shutil.copyfile(src, tmp / src.name)
        save_tensors(tmp / ROUTER_FILE, vectors)
        if projection is not None:
            p = projection.detach().to("cpu", torch.float32).contiguous()
            save_tensors(tmp / PROJECTION_FILE, {PROJECTION_KEY: p})
            embedder = {**embedder, "projection_file": PROJECTION_FILE}
        write_json(
            tmp / ANCHOR_FILE,
            {
                "format": ANCHOR_FORMAT,
                "family": family.dense_model_type,
                "shapes": shapes.to_json(),
                "router_file": ROUTER_FILE,
                "embedder": embedder,
            },
        )
    return open_anchor(out)


__all__ = ["ANCHOR_FILE", "ROUTER_FILE", "Anchor", "ExpertShapes", "create_anchor", "open_anchor"]
