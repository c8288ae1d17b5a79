"""Opt-out: remove experts from an assembled model, with no retraining.

Removing expert j deletes its FFN and its router row in every layer; the softmax then
renormalises over the rest. :func:`optout` rewrites the checkpoint through the same back end
as assembly, so ``optout(assemble(A, B, C), B)`` is byte-for-byte ``assemble(A, C)``.

:func:`masked_experts` does the same to a model already loaded for serving (license-based
use): inside the ``with`` block the model computes exactly what the opted-out checkpoint
computes; on exit the original experts are back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from flexfed.common.errors import AssemblyError, MetadataError
from flexfed.common.formats.checkpoint import (
    DEFAULT_MAX_SHARD_BYTES,
    Checkpoint,
    companion_files,
    read_json,
)
from flexfed.common.formats.families import ModelFamily, family_of_config
from flexfed.common.formats.safetensors_io import DTYPE_SIZES, TensorInfo
from flexfed.common.moe.assembly import (
    ASSEMBLY_FILE,
    ASSEMBLY_FORMAT,
    PROVENANCE_DIR,
    SlotSource,
    assembly_record,
    build_moe,
    effective_top_k,
    slot_dir_name,
)


class AssembledModel:
    """An assembled MoE checkpoint with its assembly.json, opened lazily."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.checkpoint = Checkpoint.open(self.path)
        family, is_moe = family_of_config(self.checkpoint.config)
        if not is_moe:
            raise MetadataError(f"{self.path} is a dense model, not an assembled MoE model")
        self.family: ModelFamily = family
        self.assembly = read_json(self.path / ASSEMBLY_FILE, ASSEMBLY_FILE)
        if self.assembly.get("format") != ASSEMBLY_FORMAT:
            raise MetadataError(f"{ASSEMBLY_FILE}: format must be {ASSEMBLY_FORMAT!r}")
        self.num_experts, self.top_k = family.moe_shape(self.checkpoint.config)
        slots = self.assembly.get("slots")
        if not isinstance(slots, list) or len(slots) != self.num_experts:
            raise MetadataError(
                f"{ASSEMBLY_FILE} lists {len(slots or [])} slots, config has {self.num_experts}"
            )
        self.slots: list[dict[str, Any]] = slots

    def slot_source(self, index: int) -> SlotSource:
        family, ckpt = self.family, self.checkpoint
        record = {k: v for k, v in self.slots[index].items() if k != "slot"}
        hidden = int(ckpt.config["hidden_size"])

        def router_row(layer: int) -> tuple[Path, int, int]:
            info = ckpt.info(family.moe_router_key(layer))
            row = hidden * DTYPE_SIZES[info.dtype]
            return (info.path, info.start + index * row, row)

        prov_dir = self.path / PROVENANCE_DIR / slot_dir_name(record)
        provenance = sorted(prov_dir.iterdir()) if record.get("org") and prov_dir.is_dir() else []
        return SlotSource(
            record=record,
            ffn=lambda layer, proj: ckpt.info(family.moe_expert_key(layer, index, proj)),
            router_row=router_row,
            provenance=provenance,
        )

    def shared_tensors(self) -> dict[str, TensorInfo]:
        return {
            name: info
            for name, info in self.checkpoint.tensors.items()
            if self.family.parse_moe_key(name) is None
        }


def slots_of_orgs(model: AssembledModel, orgs: Sequence[str]) -> list[int]:
    """Slot indices of every expert owned by any of ``orgs``; unknown orgs are an error."""
    present: set[str] = {s["org"] for s in model.slots if s.get("org")}
    unknown = sorted(set(orgs) - present)
    if unknown:
        raise AssemblyError(
            f"no expert of {', '.join(unknown)} in {model.path}; "
            f"its experts belong to: {', '.join(sorted(present)) or 'nobody'}"
        )
    return [i for i, s in enumerate(model.slots) if s.get("org") in set(orgs)]


def optout(
    model_dir: Path | str,
    drop_orgs: Sequence[str],
    out: Path | str,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    on_bytes: Any = None,
) -> dict[str, Any]:
    """Write a copy of an assembled model without the experts of ``drop_orgs``."""
    if not drop_orgs:
        raise AssemblyError("name at least one organisation to drop (--drop ORG)")
    model = AssembledModel(model_dir)
    dropped = set(slots_of_orgs(model, drop_orgs))
    keep = [i for i in range(model.num_experts) if i not in dropped]
    slots = [model.slot_source(i) for i in keep]
    requested = int(model.assembly.get("requested_top_k", model.top_k))
    k = effective_top_k(requested, len(slots))
    config = model.family.with_experts(model.checkpoint.config, len(slots), k)
    removed = [*model.assembly.get("removed", []), *(model.slots[i] for i in sorted(dropped))]
    record = assembly_record(
        model.family, str(model.assembly["anchor_digest"]), slots, k, requested, removed
    )
    if "router_tuning" in model.assembly:
        # NOTE: the kept router rows are tuned ones; say so, and which slots the tuning (and
        # its untuned_routers file, copied as is, one row per slot at tuning) had.
        record["router_tuning"] = {
            **model.assembly["router_tuning"],
            "slots_at_tuning": model.assembly.get("router_tuning", {}).get(
                "slots_at_tuning",
                [
                    f"{s.get('org')}--{s.get('name')}" if s.get("org") else "public"
                    for s in model.slots
                ],
            ),
        }
    companions = companion_files(model.path, exclude={ASSEMBLY_FILE, "model.sig"})
    build_moe(
        Path(out),
        model.family,
        config,
        model.shared_tensors(),
        slots,
        companions,
        record,
        max_shard_bytes,
        on_bytes,
    )
    return record


# --- serving: mask experts of a loaded model --------------------------------------------


_T = TypeVar("_T")


def _attr(obj: nn.Module, name: str, kind: type[_T]) -> _T:
    """``obj.<name>``, checked to be a ``kind``.

    NOTE: mypy reads every attribute of an ``nn.Module`` as ``Tensor | Module``
    (``Module.__getattr__``); the MoE blocks are found by duck typing, so narrow here.
    """
    value = getattr(obj, name)
    if not isinstance(value, kind):
        raise AssemblyError(
            f"{type(obj).__name__}.{name} is a {type(value).__name__}, not a {kind.__name__}; "
            "cannot mask the experts of this model"
        )
    return value


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    """The MoE blocks of a loaded model (modules with a ``gate`` and ``experts``), in order."""
    return [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]


@contextmanager
def masked_experts(model: nn.Module, drop_slots: Sequence[int]) -> Iterator[nn.Module]:
    """Temporarily remove expert slots from a loaded MoE model (e.g. per request).

    Inside the block the model is exactly the opted-out model: the dropped experts' FFNs and
    router rows are gone and the softmax renormalises over the rest.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise AssemblyError(f"{type(model).__name__} has no MoE blocks to mask")
    first_gate = _attr(blocks[0], "gate", nn.Module)
    num_experts = _attr(first_gate, "weight", torch.Tensor).shape[0]
    drop = set(drop_slots)
    if not drop <= set(range(num_experts)) or 0 in drop:
        raise AssemblyError(f"can only mask expert slots 1..{num_experts - 1}, got {sorted(drop)}")
    keep = torch.tensor([i for i in range(num_experts) if i not in drop])
    top_k = min(_attr(first_gate, "top_k", int), len(keep))
    saved: list[tuple[nn.Module, str, Any]] = []

    def swap(obj: nn.Module, name: str, value: Any) -> None:
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        with torch.no_grad():
            for block in blocks:
                gate = _attr(block, "gate", nn.Module)
                experts = _attr(block, "experts", nn.Module)
                weight = _attr(gate, "weight", torch.Tensor)
                swap(gate, "weight", nn.Parameter(weight[keep].clone(), requires_grad=False))
                swap(gate, "num_experts", len(keep))
                swap(gate, "top_k", top_k)
                if hasattr(block, "top_k"):
                    swap(block, "top_k", top_k)
                for name in ("gate_up_proj", "down_proj"):
                    param = getattr(experts, name)
                    swap(experts, name, nn.Parameter(param[keep].clone(), requires_grad=False))
                swap(experts, "num_experts", len(keep))
        yield model
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
