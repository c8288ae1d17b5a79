"""``flexfed inspect``: what is this directory? A public model, an expert bundle or an MoE."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from flexfed.common.errors import MissingFileError
from flexfed.common.formats.anchor import ANCHOR_FILE, ExpertShapes, open_anchor
from flexfed.common.formats.bundle import EXPERT_META, EXPERT_WEIGHTS, ExpertMeta
from flexfed.common.formats.checkpoint import Checkpoint, read_json
from flexfed.common.formats.families import family_of_config
from flexfed.common.formats.safetensors_io import read_header
from flexfed.common.moe.assembly import ASSEMBLY_FILE
from flexfed.common.moe.optout import AssembledModel
from flexfed.common.moe.privacy import privacy_summary
from flexfed.common.util.digest import sha256_file
from flexfed.common.util.text import printable


def describe(path: Path) -> dict[str, Any]:
    """A JSON-able summary of a public model, anchor, expert bundle or assembled model."""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist")
    if (path / EXPERT_META).is_file():
        meta = ExpertMeta.from_json(read_json(path / EXPERT_META, EXPERT_META))
        header = read_header(path / EXPERT_WEIGHTS)
        return {
            "kind": "expert bundle",
            "path": str(path),
            **meta.to_json(),
            "differential_privacy": privacy_summary(meta.training),
            "tensors": len(header.tensors),
            "parameters": sum(t.numel for t in header.tensors.values()),
            "weights_sha256": sha256_file(path / EXPERT_WEIGHTS),
            "files": sorted(p.name for p in path.iterdir()),
        }
    if (path / ASSEMBLY_FILE).is_file():
        model = AssembledModel(path)
        return {
            "kind": "assembled model",
            "path": str(path),
            "model_type": model.checkpoint.model_type,
            "family": model.family.dense_model_type,
            "num_experts": model.num_experts,
            "top_k": model.top_k,
            "parameters": model.checkpoint.num_parameters(),
            "anchor_digest": model.assembly.get("anchor_digest"),
            "slots": model.slots,
            "removed": model.assembly.get("removed", []),
            "weight_files": list(model.checkpoint.weight_files),
        }
    ckpt = Checkpoint.open(path)
    family, is_moe = family_of_config(ckpt.config)
    out: dict[str, Any] = {
        "kind": "MoE model (no assembly.json)" if is_moe else "public model",
        "path": str(path),
        "model_type": ckpt.model_type,
        "family": family.dense_model_type,
        "parameters": ckpt.num_parameters(),
        "weight_files": list(ckpt.weight_files),
    }
    if not is_moe:
        out["shapes"] = ExpertShapes.of_checkpoint(ckpt, family).to_json()
        if (path / ANCHOR_FILE).is_file():
            anchor = open_anchor(path)
            out["kind"] = "anchor"
            out["anchor_digest"] = anchor.digest
            out["embedder"] = anchor.meta.get("embedder")
    return out


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def command(path: Path, as_json: bool) -> None:
    """Summarise a public model, an expert bundle or an assembled model."""
    info = describe(path)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    # Values come from the artifact (an owner wrote expert.json): never raw to the terminal.
    click.echo(printable(f"{info['kind']}: {info['path']}"))
    for key, value in info.items():
        if key in {"kind", "path", "slots"}:
            continue
        if key == "differential_privacy" and value is None:
            value = "none (trained without DP)"
        elif key == "training" and isinstance(value, dict):
            value = ", ".join(
                f"{k}={v}"
                for k, v in value.items()
                if k not in ("hyperparameters", "differential_privacy")
            )
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(str(v) for v in value) or "-"
        click.echo(printable(f"  {key:<18} {value}"))
    for slot in info.get("slots", []):
        who = slot.get("org") or "public"
        digest = (slot.get("expert_sha256") or "")[:16]
        line = f"  slot {slot['slot']:<3} {who:<20} {slot.get('name', ''):<16} {digest}"
        click.echo(printable(line))
