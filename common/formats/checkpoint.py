"""Hugging Face checkpoint directories: reading them lazily, writing them by streaming.

A :class:`Checkpoint` knows where every tensor's bytes lie (strictly parsed headers) without
loading any of them. :func:`write_checkpoint` writes a sharded checkpoint from a list of
:class:`OutTensor` whose bytes are copied from their sources one tensor at a time, so peak
memory is one copy buffer, whatever the size of the model.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexfed.common.errors import (
    InvalidInputError,
    MissingFileError,
    SafetensorsFormatError,
    UnsupportedModelError,
)
from flexfed.common.formats.safetensors_io import (
    OutTensor,
    TensorInfo,
    read_header,
    read_tensor,
    write_safetensors,
)
from flexfed.common.util.jsonio import write_json

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
MAX_JSON_BYTES = 4 * 1024 * 1024


def read_json(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Read a small JSON object file with a size limit and a clear error."""
    if not path.is_file():
        raise MissingFileError(f"{what} not found: {path}")
    if path.stat().st_size > max_bytes:
        raise InvalidInputError(f"{what} {path} is larger than {max_bytes} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise InvalidInputError(f"{what} {path} is not valid JSON: {err}") from err
    if not isinstance(doc, dict):
        raise InvalidInputError(f"{what} {path} is not a JSON object")
    return doc


@dataclass(frozen=True)
class Checkpoint:
    """A local HF checkpoint directory with safetensors weights."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    weight_files: tuple[str, ...]

    @classmethod
    def open(cls, path: Path | str) -> Checkpoint:
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"model directory not found: {path}")
        config = read_json(path / CONFIG_FILE, "config.json")
        if (path / INDEX_FILE).is_file():
            index = read_json(path / INDEX_FILE, "weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict):
                raise InvalidInputError(f"{path / INDEX_FILE} has no weight_map")
            files = tuple(sorted(set(weight_map.values())))
        elif (path / SINGLE_FILE).is_file():
            weight_map = None
            files = (SINGLE_FILE,)
        else:
            raise UnsupportedModelError(
                f"{path} has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights are "
                "supported (flexfed never loads pickled .bin files)"
            )
        tensors: dict[str, TensorInfo] = {}
        for name in files:
            if "/" in name or name.startswith("."):
                raise InvalidInputError(f"weight index names a file outside the model: {name!r}")
            header = read_header(path / name)
            for key, info in header.tensors.items():
                if key in tensors:
                    raise SafetensorsFormatError(f"tensor {key!r} appears in two weight files")
                if weight_map is not None and weight_map.get(key) != name:
                    raise InvalidInputError(f"{key!r} is in {name} but the index says otherwise")
                tensors[key] = info
        if weight_map is not None and set(weight_map) != set(tensors):
            missing = sorted(set(weight_map) - set(tensors))[:3]
            raise InvalidInputError(f"the weight index lists tensors not in any file: {missing}")
        return cls(path, config, tensors, files)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise InvalidInputError(f"{self.path} has no tensor {key!r}") from None

    def tensor(self, key: str) -> torch.Tensor:
        return read_tensor(self.info(key))

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())


# Files that describe the weights themselves; everything else (tokenizer, generation config)
# travels with a model when it is assembled or rewritten.
_WEIGHT_FILE = re.compile(r"(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json)")


def companion_files(path: Path, exclude: set[str]) -> list[Path]:
    """Top-level files to copy along with a model (tokenizer files, generation config...)."""
    out = []
    for p in sorted(path.iterdir()):
        if not p.is_file() or p.name in exclude or p.name == CONFIG_FILE:
            continue
        if _WEIGHT_FILE.fullmatch(p.name) or p.suffix in {".bin", ".pt", ".pth", ".pkl"}:
            continue
        out.append(p)
    return out


def natural_key(name: str) -> list[Any]:
    """Sort 'layers.2' before 'layers.10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class ShardPlan:
    shards: list[list[OutTensor]] = field(default_factory=list)

    def file_names(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return [SINGLE_FILE]
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(tensors: Sequence[OutTensor], max_shard_bytes: int) -> ShardPlan:
    """Greedy, order-preserving sharding: deterministic for the same tensors and limit."""
    plan = ShardPlan()
    current: list[OutTensor] = []
    size = 0
    for t in tensors:
        if current and size + t.nbytes > max_shard_bytes:
            plan.shards.append(current)
            current, size = [], 0
        current.append(t)
        size += t.nbytes
    plan.shards.append(current)
    return plan


def write_checkpoint(
    out_dir: Path,
    tensors: Sequence[OutTensor],
    config: dict[str, Any],
    companions: Sequence[Path] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
) -> list[str]:
    """Write config.json, the weight shards (+ index) and companion files into ``out_dir``.

    Returns the weight file names. The same tensors, config and limit give the same bytes.
    """
    plan = plan_shards(tensors, max_shard_bytes)
    names = plan.file_names()
    weight_map: dict[str, str] = {}
    for name, shard in zip(names, plan.shards, strict=True):
        write_safetensors(out_dir / name, shard, {"format": "pt"}, on_bytes)
        weight_map.update({t.name: name for t in shard})
    if len(names) > 1:
        total = sum(t.nbytes for t in tensors)
        write_json(
            out_dir / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    write_json(out_dir / CONFIG_FILE, config)
    for src in companions:
        shutil.copyfile(src, out_dir / src.name)
    return names
