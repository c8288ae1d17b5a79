"""Held-out evaluation: per-domain next-token loss and perplexity of any supported checkpoint.

Dense public models and assembled MoE models are evaluated the same way, through
``AutoModelForCausalLM``: what a user of the released model would load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flexfed.common.data import is_validation_document, pack_documents
from flexfed.common.errors import DataError, MissingFileError
from flexfed.common.progress import count_progress


def held_out(docs: Sequence[str], val_fraction: float) -> list[str]:
    """The documents the trainer holds out (the same document-level rule)."""
    return [d for d in docs if is_validation_document(d, val_fraction)]


def load_tokenizer(model_dir: Path | str) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise MissingFileError(f"cannot load the tokenizer of {model_dir}: {err}") from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


@torch.no_grad()
def evaluate_model(
    model_dir: Path | str,
    domains: Mapping[str, Sequence[str]],
    seq_len: int = 256,
    max_sequences: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per domain: mean next-token loss, perplexity and token count over its documents."""
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    packed = {}
    for name, docs in domains.items():
        if not docs:
            raise DataError(f"domain {name!r} has no documents to evaluate on")
        data = pack_documents(docs, tokenizer, seq_len, val_fraction=0.0).train
        packed[name] = data[:max_sequences]
    total = sum(len(d) for d in packed.values())
    results: dict[str, dict[str, Any]] = {}
    with count_progress(f"evaluating {Path(model_dir).name}", total, enabled=progress) as advance:
        for name, data in packed.items():
            loss_sum, n = 0.0, 0
            for i in range(0, len(data), batch_size):
                ids = data[i : i + batch_size]
                loss_sum += float(model(input_ids=ids, labels=ids).loss) * len(ids)
                n += len(ids)
                advance(len(ids))
            loss = loss_sum / n
            results[name] = {"loss": loss, "ppl": math.exp(loss), "tokens": n * (seq_len - 1)}
    return results
