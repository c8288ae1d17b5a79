"""Held-out evaluation: per-domain next-token loss and perplexity of any supported checkpoint.

Dense public models and assembled MoE models are evaluated the same way, through
``AutoModelForCausalLM``: what a user of the released model would load.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from flexfed.common.data.packing import is_validation_document, pack_documents
from flexfed.common.errors import DataError, InvalidInputError, MissingFileError
from flexfed.common.util.progress import count_progress


def held_out(docs: Sequence[str], val_fraction: float) -> list[str]:
    """The documents the trainer holds out (the same document-level rule)."""
    return [d for d in docs if is_validation_document(d, val_fraction)]


def load_tokenizer(model_dir: Path | str) -> PreTrainedTokenizerBase:
    """The tokenizer shipped with a model directory, ready for packing and padding.

    The one loader for trainer, evaluation and anchor creation: it must have an end-of-text
    token (documents are joined with it); the pad token falls back to it.
    """
    path = Path(model_dir)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise MissingFileError(
            f"{path} has no tokenizer files (tokenizer.json); "
            "the public model must ship its tokenizer"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise MissingFileError(f"cannot load the tokenizer of {path}: {err}") from err
    if tok.eos_token_id is None:
        raise InvalidInputError(f"the tokenizer of {path} has no end-of-text token")
    if tok.pad_token_id is None:
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
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.eval is unannotated
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


@torch.no_grad()
def routing_statistics(
    model_dir: Path | str,
    domains: Mapping[str, Sequence[str]],
    seq_len: int = 256,
    max_sequences: int = 16,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Mean router probability of each expert, per layer and domain, of an MoE checkpoint.

    Returns ``{"experts": E, "layers": L, "probs": {domain: [[p_layer_expert]]}}``: which expert
    takes which domain's tokens (the full softmax, before top-k).
    """
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.eval is unannotated
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    if not gates:
        raise DataError(f"{model_dir} is not an MoE model; routing statistics need experts")
    captured: list[torch.Tensor] = []

    def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        weight = cast(torch.Tensor, _m.weight)  # the router's (E, H) parameter
        captured.append(torch.softmax(torch.nn.functional.linear(x, weight).float(), dim=-1))

    handles = [g.register_forward_hook(hook) for g in gates]
    probs: dict[str, list[list[float]]] = {}
    try:
        for name, docs in domains.items():
            data = pack_documents(docs, tokenizer, seq_len, val_fraction=0.0).train[:max_sequences]
            sums = torch.zeros(len(gates), gates[0].weight.shape[0], dtype=torch.float64)
            count = 0
            for i in range(0, len(data), batch_size):
                captured.clear()
                model(input_ids=data[i : i + batch_size])
                for layer, p in enumerate(captured):
                    sums[layer] += p.double().sum(0)
                count += captured[0].shape[0]
            probs[name] = (sums / max(1, count)).tolist()
    finally:
        for h in handles:
            h.remove()
    return {"experts": gates[0].weight.shape[0], "layers": len(gates), "probs": probs}


def write_routing_heatmap(stats: dict[str, Any], path: Path, expert_labels: Sequence[str]) -> None:
    """One heat-map per layer: rows are domains, columns experts, cells mean probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(stats["probs"])
    layers = stats["layers"]
    fig, axes = plt.subplots(1, layers, figsize=(2.2 + 1.6 * layers, 0.6 + 0.45 * len(domains)))
    axes = [axes] if layers == 1 else list(axes)
    for layer, ax in enumerate(axes):
        grid = [stats["probs"][d][layer] for d in domains]
        ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks(range(len(expert_labels)), expert_labels, rotation=60, fontsize=7)
        ax.set_yticks(range(len(domains)), domains if layer == 0 else [], fontsize=7)
    fig.suptitle("mean router probability (rows: domain, columns: expert)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
