"""Assembly: public model + n expert bundles -> one MoE checkpoint that loads in transformers.

Slot 0 is the public FFN with r_pub; slot j is the j-th accepted expert. Shared tensors come
from the public model unchanged. The learned bias b_i has no slot in the HF classes (it is a
training device; the released FlexOlmo models route without it) and is not in the checkpoint.

What an auditor needs to check each slot against its owner's signature is kept beside the
weights, under ``provenance/<org>--<name>/``: the bundle's ``expert.json``, ``model.sig`` and
``provenance.intoto.json``, plus :data:`ROUTER_BIAS_FILE` (the b_i the checkpoint drops) and
:data:`WEIGHTS_HEADER_FILE` (the exact header of the signed ``expert.safetensors``). The
slot's FFN tensors and router row in the checkpoint, the biases and that header rebuild the
signed file byte for byte (:mod:`flexfed.common.trust.audit`), whatever tool wrote it.

Assembly never loads a model: every output tensor is a list of byte ranges of the source
files (a router matrix is r_pub's bytes followed by each expert's r_i bytes), streamed into
shards one tensor at a time. Peak memory is one copy buffer, whatever the number of experts,
and the output directory appears only when it is complete.

:func:`build_moe` is the shared back end: opt-out feeds it the same slot sources read from an
assembled model, so removing an expert produces the very bytes that assembling without it
does.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexfed.common.errors import AssemblyError, FlexfedError, InvalidInputError, VerificationError
from flexfed.common.formats.anchor import ANCHOR_FILE, PROJECTION_FILE, ROUTER_FILE, Anchor
from flexfed.common.formats.bundle import EXPERT_WEIGHTS, ExpertBundle, validate_bundle
from flexfed.common.formats.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    Checkpoint,
    companion_files,
    natural_key,
    write_checkpoint,
)
from flexfed.common.formats.families import PROJECTIONS, ModelFamily
from flexfed.common.formats.safetensors_io import (
    OutTensor,
    TensorInfo,
    read_header,
    write_safetensors,
)
from flexfed.common.util.fs import atomic_directory
from flexfed.common.util.jsonio import StrictJSONError, loads_strict, write_json

ASSEMBLY_FILE = "assembly.json"
ASSEMBLY_FORMAT = "flexfed.assembly/v1"
PROVENANCE_DIR = "provenance"
DEFAULT_TOP_K = 4
#: Under provenance/<slot dir>/: the expert's router biases b_i (``layers.L.router.bias``).
ROUTER_BIAS_FILE = "router_bias.safetensors"
#: Under provenance/<slot dir>/: the header of the signed expert.safetensors, byte for byte
#: (the JSON after the 8-byte length, padding included): its key order, offsets and metadata.
WEIGHTS_HEADER_FILE = "expert.safetensors.header"
_COPY_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class SlotSource:
    """Where one expert slot's tensors come from, per layer."""

    record: dict[str, Any]  # the slot's entry in assembly.json (without its index)
    ffn: Callable[[int, str], TensorInfo]  # (layer, proj) -> the FFN tensor
    router_row: Callable[[int], tuple[Path, int, int]]  # layer -> byte range of its router row
    provenance: Sequence[Path] = ()  # files kept under provenance/<slot dir>/
    # The signed expert.safetensors the slot comes from: its biases and header are kept too.
    weights: Path | None = None


def _whole(info: TensorInfo) -> tuple[Path, int, int]:
    return (info.path, info.start, info.nbytes)


def public_slot(anchor: Anchor) -> SlotSource:
    family = anchor.family
    return SlotSource(
        record={"kind": "public", "org": None, "name": "public"},
        ffn=lambda layer, proj: anchor.checkpoint.info(family.dense_ffn_key(layer, proj)),
        router_row=lambda layer: _whole(anchor.r_pub_info(layer)),
    )


def expert_slot(bundle: ExpertBundle) -> SlotSource:
    provenance = [p for p in sorted(bundle.path.iterdir()) if p.name != "expert.safetensors"]
    return SlotSource(
        record={
            "kind": "expert",
            "org": bundle.meta.org,
            "name": bundle.meta.name,
            "expert_sha256": bundle.weights_sha256,
            "meta_sha256": bundle.meta_sha256,
            "data_commitment": bundle.meta.data_commitment,
            "license": bundle.meta.license,
            "log_index": None,
        },
        ffn=lambda layer, proj: bundle.info(layer, f"{proj}.weight"),
        router_row=lambda layer: _whole(bundle.info(layer, "router.weight")),
        provenance=provenance,
        weights=bundle.path / EXPERT_WEIGHTS,
    )


def slot_dir_name(record: dict[str, Any]) -> str:
    """The folder under provenance/ that keeps a slot's bundle metadata."""
    return f"{record['org']}--{record['name']}"


def write_rebuild_files(weights: Path, dest: Path) -> None:
    """Keep what the checkpoint drops from a signed expert, so it can be rebuilt exactly.

    Writes :data:`WEIGHTS_HEADER_FILE` (the raw header of ``weights``) and
    :data:`ROUTER_BIAS_FILE` (its ``layers.L.router.bias`` tensors, copied byte for byte, in
    layer order) into ``dest``.
    """
    header = read_header(weights)  # strict: offsets contiguous, so header + data is the file
    with open(weights, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        (dest / WEIGHTS_HEADER_FILE).write_bytes(f.read(length))
    biases = sorted(
        (info for name, info in header.tensors.items() if name.endswith(".router.bias")),
        key=lambda info: natural_key(info.name),
    )
    write_safetensors(
        dest / ROUTER_BIAS_FILE,
        [OutTensor(i.name, i.dtype, i.shape, pieces=(_whole(i),)) for i in biases],
        {"format": "pt"},
    )


class RebuildError(VerificationError):
    """A slot's tensors cannot be put back into its signed expert's layout."""


def expert_pieces(
    checkpoint: Checkpoint, family: ModelFamily, index: int, prov_dir: Path
) -> tuple[bytes, list[tuple[Path, int, int]]]:
    """The bytes of slot ``index``'s signed expert.safetensors, as (header, byte ranges).

    The header is the one kept in ``prov_dir`` (with its 8-byte length prefix put back); each
    tensor it lists, in data order, comes from the checkpoint (``layers.L.<proj>.weight``: the
    slot's FFN; ``layers.L.router.weight``: row ``index`` of the router) or from the kept
    :data:`ROUTER_BIAS_FILE`. The inverse of :func:`write_rebuild_files`; raises
    :class:`RebuildError` when the header does not describe this slot's tensors.
    """
    raw = (prov_dir / WEIGHTS_HEADER_FILE).read_bytes()
    try:
        doc = loads_strict(raw)
    except StrictJSONError as err:
        if err.kind == "duplicate":
            raise RebuildError(f"{WEIGHTS_HEADER_FILE} {err}") from err
        raise RebuildError(f"{WEIGHTS_HEADER_FILE} is not a safetensors header: {err}") from err
    if not isinstance(doc, dict):
        raise RebuildError(f"{WEIGHTS_HEADER_FILE} is not a safetensors header")
    doc.pop("__metadata__", None)
    try:
        biases = read_header(prov_dir / ROUTER_BIAS_FILE).tensors
    except FlexfedError as err:
        raise RebuildError(f"{ROUTER_BIAS_FILE}: {err}") from err
    cursor = 0
    pieces: list[tuple[Path, int, int]] = []
    for name, entry in sorted(doc.items(), key=lambda kv: _offsets(kv[0], kv[1])[0]):
        begin, end = _offsets(name, entry)
        if begin != cursor:
            raise RebuildError(f"{WEIGHTS_HEADER_FILE}: the data of {name!r} is not contiguous")
        info = _source_of(name, checkpoint, family, index, biases)
        if info.dtype != entry.get("dtype") or list(info.shape) != entry.get("shape"):
            raise RebuildError(
                f"{name} is {entry.get('dtype')}{entry.get('shape')} in the signed expert, "
                f"{info.dtype}{list(info.shape)} in slot {index}"
            )
        if end - begin != info.nbytes:
            raise RebuildError(f"{WEIGHTS_HEADER_FILE}: {name!r} has the wrong byte length")
        pieces.append((info.path, info.start, info.nbytes))
        cursor = end
    return struct.pack("<Q", len(raw)) + raw, pieces


def _offsets(name: str, entry: Any) -> tuple[int, int]:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise RebuildError(f"{WEIGHTS_HEADER_FILE}: malformed entry for {name!r}")
    return offsets[0], offsets[1]


def _source_of(
    name: str,
    checkpoint: Checkpoint,
    family: ModelFamily,
    index: int,
    biases: Mapping[str, TensorInfo],
) -> TensorInfo:
    """Where tensor ``name`` of slot ``index``'s expert lies now (checkpoint or bias file)."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit():
        raise RebuildError(f"{name!r} is not a tensor of an expert bundle")
    layer, part = int(parts[1]), ".".join(parts[2:])
    try:
        if part == "router.bias":
            return biases[name]
        if part == "router.weight":
            router = checkpoint.info(family.moe_router_key(layer))  # (E, H)
            if router.shape[0] <= index:
                raise RebuildError(f"the router of layer {layer} has no row {index}")
            row = router.nbytes // router.shape[0]
            return TensorInfo(
                name, router.dtype, router.shape[1:], router.path, router.start + index * row, row
            )
        proj = part.removesuffix(".weight")
        if proj in PROJECTIONS and part.endswith(".weight"):
            return checkpoint.info(family.moe_expert_key(layer, index, proj))
    except (KeyError, InvalidInputError) as err:
        raise RebuildError(f"slot {index} has no tensor for {name!r}: {err}") from err
    raise RebuildError(f"{name!r} is not a tensor of an expert bundle")


def rebuild_expert_weights(
    checkpoint: Checkpoint, family: ModelFamily, index: int, prov_dir: Path, out: Path
) -> str:
    """Write slot ``index``'s signed expert.safetensors to ``out``; return its hex SHA-256."""
    header, pieces = expert_pieces(checkpoint, family, index, prov_dir)
    h = hashlib.sha256(header)
    with open(out, "wb") as dst:
        dst.write(header)
        for path, start, length in pieces:
            with open(path, "rb") as src:
                src.seek(start)
                while length:
                    chunk = src.read(min(_COPY_CHUNK, length))
                    if not chunk:
                        raise RebuildError(f"{path.name} ends inside a tensor of slot {index}")
                    dst.write(chunk)
                    h.update(chunk)
                    length -= len(chunk)
    return h.hexdigest()


def moe_tensors(
    family: ModelFamily,
    shared: dict[str, TensorInfo],
    slots: Sequence[SlotSource],
    num_layers: int,
    hidden_size: int,
    dtype: str,
) -> list[OutTensor]:
    """Every tensor of the MoE checkpoint, in canonical (natural-sorted) order."""
    out = [
        OutTensor(info.name, info.dtype, info.shape, pieces=(_whole(info),))
        for info in shared.values()
    ]
    for layer in range(num_layers):
        rows = tuple(slot.router_row(layer) for slot in slots)
        out.append(
            OutTensor(family.moe_router_key(layer), dtype, (len(slots), hidden_size), pieces=rows)
        )
        for e, slot in enumerate(slots):
            for proj in PROJECTIONS:
                info = slot.ffn(layer, proj)
                if info.dtype != dtype:
                    raise AssemblyError(f"slot {e} {proj} is {info.dtype}, the model is {dtype}")
                key = family.moe_expert_key(layer, e, proj)
                out.append(OutTensor(key, info.dtype, info.shape, pieces=(_whole(info),)))
    out.sort(key=lambda t: natural_key(t.name))
    return out


def build_moe(
    out: Path,
    family: ModelFamily,
    moe_config: dict[str, Any],
    shared: dict[str, TensorInfo],
    slots: Sequence[SlotSource],
    companions: Sequence[Path],
    assembly: dict[str, Any],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    overwrite: bool = False,
) -> None:
    """Write an MoE checkpoint atomically: weights, config, companions, assembly.json."""
    tensors = moe_tensors(
        family,
        shared,
        slots,
        int(moe_config["num_hidden_layers"]),
        int(moe_config["hidden_size"]),
        _dtype_of(slots),
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, tensors, moe_config, companions, max_shard_bytes, on_bytes)
        for slot in slots:
            if slot.provenance or slot.weights is not None:
                dest = tmp / PROVENANCE_DIR / slot_dir_name(slot.record)
                dest.mkdir(parents=True)
                for src in slot.provenance:
                    (dest / src.name).write_bytes(src.read_bytes())
                if slot.weights is not None:
                    write_rebuild_files(slot.weights, dest)
        write_json(tmp / ASSEMBLY_FILE, assembly)


def _dtype_of(slots: Sequence[SlotSource]) -> str:
    return slots[0].ffn(0, "gate_proj").dtype


def total_bytes(shared: dict[str, TensorInfo], slots: Sequence[SlotSource], layers: int) -> int:
    ffn = sum(s.ffn(layer, p).nbytes for s in slots for layer in range(layers) for p in PROJECTIONS)
    routers = sum(s.router_row(layer)[2] for s in slots for layer in range(layers))
    return sum(i.nbytes for i in shared.values()) + ffn + routers


def assembly_record(
    family: ModelFamily,
    anchor_digest: str,
    slots: Sequence[SlotSource],
    top_k: int,
    requested_top_k: int,
    removed: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    return {
        "format": ASSEMBLY_FORMAT,
        "family": family.dense_model_type,
        "moe_model_type": family.moe_model_type,
        "anchor_digest": anchor_digest,
        "num_experts": len(slots),
        "top_k": top_k,
        "requested_top_k": requested_top_k,
        "slots": [{"slot": i, **s.record} for i, s in enumerate(slots)],
        "removed": list(removed),
        # Filled by flexfed.common.trust.release.record_release before the release is signed.
        "release_log_index": None,
        "log_checkpoint": None,
    }


def effective_top_k(requested: int, num_experts: int) -> int:
    if requested < 1:
        raise AssemblyError(f"--top-k must be at least 1, got {requested}")
    return min(requested, num_experts)


def assemble(
    anchor: Anchor,
    expert_dirs: Sequence[Path | str],
    out: Path | str,
    top_k: int = DEFAULT_TOP_K,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Callable[[int], None] | None = None,
    bundles: Sequence[ExpertBundle] | None = None,
) -> dict[str, Any]:
    """Validate the experts against the anchor and write the assembled model to ``out``.

    Returns the assembly record (also written as assembly.json). ``top_k`` is capped at the
    number of experts, 1 + len(expert_dirs).
    """
    if bundles is None:
        bundles = [validate_bundle(Path(d), anchor) for d in expert_dirs]
    seen: dict[str, str] = {}
    for b in bundles:
        key = f"{b.meta.org}--{b.meta.name}"
        if key in seen or b.weights_sha256 in seen.values():
            raise AssemblyError(f"expert {b.meta.org}/{b.meta.name} is given twice")
        seen[key] = b.weights_sha256
    slots = [public_slot(anchor), *(expert_slot(b) for b in bundles)]
    k = effective_top_k(top_k, len(slots))
    family = anchor.family
    config = family.moe_config(anchor.checkpoint.config, len(slots), k)
    shared = {
        name: info
        for name, info in anchor.checkpoint.tensors.items()
        if not family.is_dense_ffn_key(name)
    }
    record = assembly_record(family, anchor.digest, slots, k, top_k)
    exclude = {ANCHOR_FILE, ROUTER_FILE, PROJECTION_FILE, "model.sig"}
    companions = companion_files(anchor.path, exclude=exclude)
    build_moe(
        Path(out), family, config, shared, slots, companions, record, max_shard_bytes, on_bytes
    )
    return record
