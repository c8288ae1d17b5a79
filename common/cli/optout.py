"""``flexfed optout``: remove organisations' experts from an assembled model."""

from __future__ import annotations

from pathlib import Path

import click

from flexfed.common.cli.options import parse_size
from flexfed.common.formats.checkpoint import DEFAULT_MAX_SHARD_BYTES
from flexfed.common.moe.optout import AssembledModel, optout
from flexfed.common.util.progress import byte_progress


@click.command("optout")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option(
    "--drop", "drop", multiple=True, required=True, help="Organisation to remove (repeat)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory (must not exist).",
)
@click.option(
    "--max-shard-size",
    default=str(DEFAULT_MAX_SHARD_BYTES),
    show_default=True,
    help="Largest weight shard, e.g. 500MB or 2GB.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(
    model_dir: Path, drop: tuple[str, ...], out: Path, max_shard_size: str, quiet: bool
) -> None:
    """Write MODEL_DIR without the experts of the --drop organisations (no retraining)."""
    total = AssembledModel(model_dir).checkpoint.total_bytes()
    with byte_progress("removing experts", total, enabled=not quiet) as advance:
        record = optout(model_dir, drop, out, parse_size(max_shard_size), advance)
    left = ", ".join(s["org"] for s in record["slots"][1:]) or "none"
    n, k = record["num_experts"], record["top_k"]
    click.echo(f"wrote {out}: {n} experts left (public + {left}), top-{k}")
