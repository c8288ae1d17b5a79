"""Assembly: public model + n expert bundles -> one MoE checkpoint that loads in transformers.

Slot 0 is the public FFN with r_pub; slot j is the j-th accepted expert. Shared tensors come
from the public model unchanged. The learned bias b_i has no slot in the HF classes (it is a
training device; the released FlexOlmo models route without it) and is not carried over.

Assembly never loads a model: every output tensor is a list of byte ranges of the source
files (a router matrix is r_pub's bytes followed by each expert's r_i bytes), streamed into
shards one tensor at a time. Peak memory is one copy buffer, whatever the number of experts,
and the output directory appears only when it is complete.

:func:`build_moe` is the shared back end: opt-out feeds it the same slot sources read from an
assembled model, so removing an expert produces the very bytes that assembling without it
does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexfed.common.anchor import ANCHOR_FILE, ROUTER_FILE, Anchor
from flexfed.common.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    atomic_directory,
    companion_files,
    natural_key,
    write_checkpoint,
    write_json,
)
from flexfed.common.errors import AssemblyError
from flexfed.common.families import PROJECTIONS, ModelFamily
from flexfed.common.safetensors_io import OutTensor, TensorInfo
from flexfed.common.validation import ExpertBundle, validate_bundle

ASSEMBLY_FILE = "assembly.json"
ASSEMBLY_FORMAT = "flexfed.assembly/v1"
PROVENANCE_DIR = "provenance"
DEFAULT_TOP_K = 4


@dataclass(frozen=True)
class SlotSource:
    """Where one expert slot's tensors come from, per layer."""

    record: dict[str, Any]  # the slot's entry in assembly.json (without its index)
    ffn: Callable[[int, str], TensorInfo]  # (layer, proj) -> the FFN tensor
    router_row: Callable[[int], tuple[Path, int, int]]  # layer -> byte range of its router row
    provenance: Sequence[Path] = ()  # files kept under provenance/<slot dir>/


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
    )


def slot_dir_name(record: dict[str, Any]) -> str:
    """The folder under provenance/ that keeps a slot's bundle metadata."""
    return f"{record['org']}--{record['name']}"


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
            if slot.provenance:
                dest = tmp / PROVENANCE_DIR / slot_dir_name(slot.record)
                dest.mkdir(parents=True)
                for src in slot.provenance:
                    (dest / src.name).write_bytes(src.read_bytes())
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
    companions = companion_files(anchor.path, exclude={ANCHOR_FILE, ROUTER_FILE, "model.sig"})
    build_moe(
        Path(out), family, config, shared, slots, companions, record, max_shard_bytes, on_bytes
    )
    return record
