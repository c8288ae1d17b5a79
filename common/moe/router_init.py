"""Domain-informed router embeddings: r = mean embedding of sampled documents.

FlexOlmo initialises each owner's router row r_i as the mean embedding of documents of its
data, and r_pub as the same for public data (the coordinator computes r_pub and publishes it
with the anchor). The paper used an external embedder whose dimension equals the hidden size;
the dimension-safe default here is the public model's own representation at each MoE layer's
input, one vector per layer: exactly what that layer's router will see.

Both owners and the coordinator call :func:`mlp_input_means`, so r_i and r_pub live in the
same space by construction.

Each vector is rescaled to unit L2 norm (``norm=1.0``, the default), keeping only its
direction. The router compares rows through logit differences ``(r_i - r_pub)·x``, and:

- a raw mean's length measures how concentrated a domain's inputs are, not how well it
  separates them from other domains: with raw means a tight domain (generated arithmetic)
  has a row several times longer than a diverse one (public text, source code), so its
  expert outbids the others on everyone's tokens;
- the length sets the softmax temperature. The MLP input of a post-norm model is the raw
  residual stream (norm ~8-13 in the demo's models), so raw rows give init logit gaps of
  several nats: routing starts nearly hard, on a token-level nearest-centroid rule that is
  a weak domain classifier at small scale, and expert training then barely moves it. Unit
  rows give gaps of about ``|x| * (cos_i - cos_pub)``, a mild domain prior that training
  refines (what the owner's router learns is where its expert beats the public FFN).

Measured on the quick demo (numbers in :mod:`flexfed.server.demo.local`): with raw means the code
owner's domain did not gain in the merged model; with unit rows every owner's domain does.
Centring every row on the same vector would change nothing (the softmax is shift-invariant).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flexfed.common.errors import DataError, InvalidInputError, UnsupportedModelError
from flexfed.common.moe.config import (
    DEFAULT_ROUTER_DOCUMENTS,
    DEFAULT_ROUTER_MAX_TOKENS,
    DEFAULT_ROUTER_SEED,
)

log = logging.getLogger(__name__)

DEFAULT_DOCUMENTS = DEFAULT_ROUTER_DOCUMENTS
DEFAULT_MAX_TOKENS = DEFAULT_ROUTER_MAX_TOKENS
DEFAULT_NORM = 1.0  # L2 norm of every router embedding; None in the API keeps the raw mean


def sample_documents(docs: Sequence[str], n: int, seed: int = DEFAULT_ROUTER_SEED) -> list[str]:
    """Up to ``n`` documents, sampled without replacement with a fixed seed."""
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError("no non-empty documents to compute a router embedding from")
    if len(docs) <= n:
        return list(docs)
    return random.Random(seed).sample(list(docs), n)


@torch.no_grad()
def document_mlp_inputs(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    *,
    drop_empty: bool = True,
) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Per batch of ``docs``: how many documents it held, and per layer each document's mean
    MLP input over its tokens (truncated to ``max_tokens``): float32 (B, H) tensors.

    These are the vectors each layer's router reads. With ``drop_empty`` a document with no
    tokens is left out of its batch's rows; without, it gets a zero row, so rows stay aligned
    with ``docs``.
    """
    # NOTE: a generator: the hooks live while it is being consumed, and are removed when it
    # ends, fails or is closed.
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers")
    device = next(model.parameters()).device
    captured: list[torch.Tensor | None] = [None] * len(layers)
    mask_holder: dict[str, torch.Tensor] = {}

    def hook(idx: int) -> Callable[..., None]:
        def capture(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()  # (B, T, H)
            m = mask_holder["mask"]  # (B, T, 1)
            captured[idx] = (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, H): over real tokens

        return capture

    mlps = [layer.get_submodule("mlp") for layer in layers]
    handles = [mlp.register_forward_pre_hook(hook(i)) for i, mlp in enumerate(mlps)]
    was_training = model.training
    model.train(False)
    try:
        for start in range(0, len(docs), batch_size):
            batch = list(docs[start : start + batch_size])
            enc = tokenizer(
                batch,
                add_special_tokens=False,
                truncation=True,
                max_length=max_tokens,
                padding=True,
                return_tensors="pt",
            )
            keep = enc["attention_mask"].sum(1) > 0
            if not drop_empty:
                keep[:] = True
            if not keep.any():
                continue
            ids = enc["input_ids"][keep].to(device)
            mask = enc["attention_mask"][keep].to(device)
            mask_holder["mask"] = mask.unsqueeze(-1).float()
            model(input_ids=ids, attention_mask=mask)
            rows = [c for c in captured if c is not None]
            assert len(rows) == len(layers)
            yield len(batch), rows
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def mlp_input_means(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    on_batch: Callable[[int], None] | None = None,
    *,
    norm: float | None = DEFAULT_NORM,
) -> list[torch.Tensor]:
    """Per layer, the mean over documents of the mean MLP input over each document's tokens.

    Each document is truncated to ``max_tokens`` tokens. Each layer's vector is then rescaled
    to L2 norm ``norm`` (see the module docstring for why); ``norm=None`` returns the raw
    mean. Whoever computes r_pub and whoever computes r_i must pass the same ``norm``.
    Returns float32 CPU vectors (H,).
    """
    if norm is not None and not norm > 0:
        raise InvalidInputError(f"norm must be positive or None, got {norm}")
    sums: list[torch.Tensor] = []  # per layer, float64 (H,)
    count = 0
    for n_docs, rows in document_mlp_inputs(model, tokenizer, docs, max_tokens, batch_size):
        if not sums:
            sums = [torch.zeros(c.shape[-1], dtype=torch.float64) for c in rows]
        for i, c in enumerate(rows):
            sums[i] += c.double().sum(0).cpu()
        count += rows[0].shape[0]
        if on_batch is not None:
            on_batch(n_docs)
    if count == 0:
        raise DataError("every document was empty after tokenisation")
    log.debug("router embeddings from %d documents", count)
    means = [(s / count).float() for s in sums]
    if norm is None:
        return means
    # NOTE: a zero mean (impossible for real inputs) stays zero rather than becoming NaN.
    return [m * (norm / m.norm()) if m.norm() > 0 else m for m in means]


def random_router_init(hidden_size: int, num_layers: int, seed: int) -> list[torch.Tensor]:
    """The 'no domain init' ablation: small random rows (OLMo-core's router init scale)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(hidden_size, generator=g) * 0.002 for _ in range(num_layers)]


def public_router_rows(
    public: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    kind: str = "hidden-states",
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[torch.Tensor], dict[str, object], torch.Tensor | None]:
    """The coordinator's r_pub rows, the anchor's ``embedder`` record, and any projection.

    ``kind`` is ``hidden-states`` (the public model's mean MLP input per layer, unit norm) or
    ``minilm`` (all-MiniLM-L6-v2's mean document embedding through a random projection that
    the anchor publishes, so owners map their own embeddings the same way).
    """
    record: dict[str, object] = {
        "kind": kind,
        "documents": len(docs),
        "max_tokens": max_tokens,
        "seed": seed,
    }
    if kind == "minilm":
        from flexfed.common.moe.embedder import mean_embedding, project, random_projection

        cfg = public.config
        projection = random_projection(int(cfg.hidden_size), seed)
        embedding = mean_embedding(docs, max_tokens=max_tokens)
        return project(projection, embedding, int(cfg.num_hidden_layers)), record, projection
    if kind != "hidden-states":
        raise InvalidInputError(f"unknown router embedding kind {kind!r}")
    rows = mlp_input_means(
        public, tokenizer, docs, max_tokens=max_tokens, on_batch=on_batch, norm=DEFAULT_NORM
    )
    return rows, {**record, "norm": DEFAULT_NORM}, None
