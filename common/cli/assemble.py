"""``flexfed assemble``: public model + expert bundles -> one MoE checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from flexfed.common.cli.options import parse_size
from flexfed.common.formats.anchor import open_anchor
from flexfed.common.formats.bundle import validate_bundle
from flexfed.common.formats.checkpoint import DEFAULT_MAX_SHARD_BYTES
from flexfed.common.moe.assembly import (
    DEFAULT_TOP_K,
    assemble,
    expert_slot,
    public_slot,
    total_bytes,
)
from flexfed.common.util.progress import byte_progress


@click.command("assemble")
@click.option(
    "--public",
    "public",
    required=True,
    type=click.Path(path_type=Path),
    help="The anchor: the public model directory with anchor.json.",
)
@click.option(
    "--expert",
    "experts",
    multiple=True,
    type=click.Path(path_type=Path),
    help="An expert bundle directory (repeat; slot order = order given).",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory (must not exist).",
)
@click.option(
    "--top-k",
    default=DEFAULT_TOP_K,
    show_default=True,
    type=int,
    help="Experts active per token (capped at the number of experts).",
)
@click.option(
    "--max-shard-size",
    default=str(DEFAULT_MAX_SHARD_BYTES),
    show_default=True,
    help="Largest weight shard, e.g. 500MB or 2GB.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(
    public: Path, experts: tuple[Path, ...], out: Path, top_k: int, max_shard_size: str, quiet: bool
) -> None:
    """Assemble the public model and expert bundles into one MoE checkpoint."""
    anchor = open_anchor(public)
    bundles = [validate_bundle(d, anchor) for d in experts]
    slots = [public_slot(anchor), *(expert_slot(b) for b in bundles)]
    shared = {
        n: i for n, i in anchor.checkpoint.tensors.items() if not anchor.family.is_dense_ffn_key(n)
    }
    total = total_bytes(shared, slots, anchor.shapes.num_layers)
    with byte_progress("assembling", total, enabled=not quiet) as advance:
        record = assemble(
            anchor, experts, out, top_k, parse_size(max_shard_size), advance, bundles=bundles
        )
    orgs = ", ".join(s["org"] for s in record["slots"][1:]) or "none"
    click.echo(
        f"assembled {out}: {record['moe_model_type']} with {record['num_experts']} experts "
        f"(public + {orgs}), top-{record['top_k']}"
    )
