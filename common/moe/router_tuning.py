"""Optional router tuning (RT) on proxy data: FlexOlmo's post-merge step (paper §3.3.3).

Two halves, run by different parties:

- **Proxy selection** (each *owner*, on public data; an owner's data never leaves it):
  :func:`select_proxy` scores every public document by how much it resembles the owner's
  own documents and keeps the top ``n``. The paper fine-tunes a 22M-parameter embedder as a
  binary classifier (own vs public). The small-scale equivalent here is a logistic regression
  over frozen features of the *public model* (which every owner holds): per document, the mean
  MLP input of every layer (:func:`document_features`), i.e. the space the routers themselves
  read. Positives are the owner's documents, negatives the public documents.
- **Tuning** (the *coordinator*, after assembly): :func:`tune_router` freezes every parameter
  of the assembled model except each layer's router matrix (all rows: r_pub and every r_i, as
  in the paper's code) and trains it with the LM loss plus a router z-loss on the owners'
  proxy sets and the public documents. The result is a new checkpoint in which only the router
  tensors differ; ``assembly.json`` records ``router_tuning`` so its provenance is honest.

A tuned model keeps the assembly layout, so :func:`flexfed.common.moe.optout.optout` still removes
an expert (its tuned row goes with it). What tuning does break by design: router rows are no
longer the owners' submitted r_i, so a release audit that compares router rows with the
bundles, or a ``model.sig`` over the old bytes, does not carry over (``model.sig`` is not
copied).
"""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from flexfed.common.data.packing import pack_documents
from flexfed.common.errors import ConfigError, DataError, UnsupportedModelError
from flexfed.common.formats.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, read_json
from flexfed.common.formats.families import family_of_config
from flexfed.common.formats.safetensors_io import (
    TORCH_DTYPES,
    OutTensor,
    read_header,
    tensor_bytes,
    write_safetensors,
)
from flexfed.common.moe.assembly import ASSEMBLY_FILE
from flexfed.common.moe.evaluation import load_tokenizer
from flexfed.common.moe.optout import moe_blocks
from flexfed.common.moe.router_init import document_mlp_inputs
from flexfed.common.util.fs import atomic_directory
from flexfed.common.util.jsonio import write_json
from flexfed.common.util.progress import count_progress

log = logging.getLogger(__name__)

DEFAULT_Z_LOSS = 1e-3  # the paper's router z-loss coefficient
PROXY_FOLDS = 5
#: In a tuned checkpoint: the router matrices as assembled, byte for byte, so the owners'
#: submitted r_i (and the anchor's r_pub) stay checkable against their signed bundles.
UNTUNED_ROUTERS = "router_tuning/untuned_routers.safetensors"

# --- proxy selection (owner side) -----------------------------------------------------------


@torch.no_grad()
def document_features(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    max_tokens: int = 256,
    batch_size: int = 8,
) -> torch.Tensor:
    """Per document, the mean MLP input of every layer, concatenated: (N, L * H) float32.

    The per-document counterpart of :func:`flexfed.common.moe.router_init.mlp_input_means`: the
    same hidden states the routers read, so "resembles the owner's data" is judged in the
    space routing happens in.
    """
    # NOTE: blank documents become " " and empty ones keep a zero row: one row per document.
    texts = [d if d.strip() else " " for d in docs]
    rows = [
        torch.cat(per_layer, dim=-1).cpu()
        for _, per_layer in document_mlp_inputs(
            model, tokenizer, texts, max_tokens, batch_size, drop_empty=False
        )
    ]
    if not rows:
        return torch.empty(0, 0)
    return torch.cat(rows)  # (N, L * H)


def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, l2: float, seed: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A class-balanced, L2-regularised logistic regression; returns x -> P(y = 1)."""
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardise on the training rows
    z = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(z.shape[1], generator=g) * 0.01).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    pos = float(y.sum())
    # NOTE: balance the classes: own and public sets differ in size, and an unbalanced fit
    # would mostly learn the prior, which does not change the ranking but flattens it.
    weight = torch.where(y > 0, 0.5 / max(pos, 1.0), 0.5 / max(len(y) - pos, 1.0))
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        logits = z @ w + b
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * weight).sum()
        (loss + l2 * w.square().sum()).backward()  # type: ignore[no-untyped-call]
        opt.step()
    w_, b_ = w.detach(), b.detach()
    return lambda q: torch.sigmoid(((q - mean) / std) @ w_ + b_)


def proxy_scores(
    public_features: torch.Tensor,
    own_features: torch.Tensor,
    *,
    steps: int = 300,
    lr: float = 0.05,
    l2: float = 1e-3,
    folds: int = PROXY_FOLDS,
    seed: int = 0,
) -> torch.Tensor:
    """P(own) of every public document, from a classifier that never saw it as a negative.

    The candidates are the same public documents the classifier uses as negatives; scoring a
    document with a classifier trained to call it "public" deflates exactly the candidates'
    scores. So the scores are cross-fitted: the public documents are split into ``folds``
    seeded folds and each fold is scored by a classifier trained on all own documents and the
    other folds. Measured on the quick flexmix corpora: in-sample, the math owner's best
    public document gets P(own) 0.02, cross-fitted 0.94; the top-20 ranking moves less (15-20
    of 20 the same per owner), so this matters for the probabilities more than for the
    choice. (The paper's public pool is so large that its 250k training negatives hardly
    overlap the candidates.)
    """
    n = public_features.shape[0]
    if n == 0 or own_features.shape[0] == 0:
        raise DataError("proxy selection needs public and own documents")
    folds = max(1, min(folds, n))
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.randperm(n, generator=g) % folds
    scores = torch.empty(n)
    for k in range(folds):
        held = fold_of == k
        negatives = public_features[~held] if folds > 1 else public_features
        x = torch.cat([own_features, negatives])
        y = torch.cat([torch.ones(len(own_features)), torch.zeros(len(negatives))])
        predict = _fit_logistic(x, y, steps, lr, l2, seed + k)
        scores[held] = predict(public_features[held])
    return scores


def select_proxy(
    public_docs: Sequence[str],
    own_docs: Sequence[str],
    n: int,
    *,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_tokens: int = 256,
    steps: int = 300,
    seed: int = 0,
) -> list[str]:
    """The ``n`` public documents most like ``own_docs``, best first (an owner's proxy set).

    ``public_docs`` should be the public *training* documents only (never what is evaluated
    on). ``model`` is the public model (the anchor), which every owner holds. Deterministic:
    the classifier is seeded and ties keep document order.
    """
    if n < 0:
        raise ConfigError(f"proxy set size must be non-negative, got {n}")
    public, own = list(public_docs), list(own_docs)
    if n == 0:
        return []
    feats_pub = document_features(model, tokenizer, public, max_tokens)
    feats_own = document_features(model, tokenizer, own, max_tokens)
    scores = proxy_scores(feats_pub, feats_own, steps=steps, seed=seed)
    order = sorted(range(len(public)), key=lambda i: (-float(scores[i]), i))
    return [public[i] for i in order[:n]]


# --- router tuning (coordinator side) -------------------------------------------------------


def _digest_documents(sources: Mapping[str, Sequence[str]]) -> str:
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(name.encode() + b"\0")
        for d in sources[name]:
            h.update(hashlib.sha256(d.encode("utf-8", errors="replace")).digest())
    return h.hexdigest()


def _lr_lambda(steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, round(steps * warmup_fraction))

    def factor(step: int) -> float:  # linear warmup, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def tune_router(
    model_dir: Path | str,
    docs: Sequence[str] | Mapping[str, Sequence[str]],
    out: Path | str,
    *,
    steps: int,
    lr: float = 2e-3,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    weight_decay: float = 0.1,
    warmup_fraction: float = 0.1,
    z_loss: float = DEFAULT_Z_LOSS,
    train_top_k: int | None = None,
    note: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tune every router row of an assembled model; write the result to ``out`` atomically.

    ``docs`` is either one document list or ``{source: documents}``; with sources, each
    training sequence comes from a source drawn uniformly, then a sequence drawn uniformly
    within it (the paper's mix: public and each owner's proxy set at similar weight; a plain
    union would drown the proxies, which are a subset of the public documents anyway).
    ``train_top_k`` (e.g. the number of experts, as the paper) applies during tuning only;
    the written config keeps the assembled top-k. ``note`` is stored in the record (e.g. how
    the proxies were chosen). Returns the ``router_tuning`` record written to assembly.json.
    """
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise ConfigError("steps and batch_size must be positive and seq_len at least 2")
    model_dir, out = Path(model_dir), Path(out)
    sources = dict(docs) if isinstance(docs, Mapping) else {"documents": list(docs)}
    ckpt = Checkpoint.open(model_dir)
    family, is_moe = family_of_config(ckpt.config)
    if not is_moe:
        raise UnsupportedModelError(f"{model_dir} is a dense model; router tuning needs an MoE")
    assembly = read_json(model_dir / ASSEMBLY_FILE, ASSEMBLY_FILE)
    tokenizer = load_tokenizer(model_dir)
    packed: dict[str, torch.Tensor] = {}
    for name, source_docs in sources.items():
        if not source_docs:
            raise DataError(f"router tuning source {name!r} has no documents")
        packed[name] = pack_documents(source_docs, tokenizer, seq_len, val_fraction=0.0).train

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    blocks = moe_blocks(model)  # layer order
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__} has no MoE blocks to tune")
    gates = [cast(nn.Module, block.gate) for block in blocks]
    params = [cast(nn.Parameter, gate.weight) for gate in gates]  # each (E, H)
    for p in model.parameters():
        p.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)
    num_experts = params[0].shape[0]
    assembled_top_k = int(cast(int, gates[0].top_k))
    if train_top_k is not None:
        if not 1 <= train_top_k <= num_experts:
            raise ConfigError(f"train_top_k must be in 1..{num_experts}, got {train_top_k}")
        for block, gate in zip(blocks, gates, strict=True):
            setattr(gate, "top_k", train_top_k)  # noqa: B010 (mypy: an untyped attribute)
            if hasattr(block, "top_k"):
                setattr(block, "top_k", train_top_k)  # noqa: B010

    # NOTE: the z-loss is computed from each router's input in a forward hook rather than
    # through ``output_router_logits``: with that flag HF also adds its load-balancing loss
    # (the paper uses none), and the hook works the same for every family.
    z_terms: list[torch.Tensor] = []

    def z_hook(module: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])  # (B*T, H)
        logits = F.linear(x, cast(torch.Tensor, module.weight))  # (B*T, E)
        z_terms.append(torch.logsumexp(logits.float(), dim=-1).square().mean())

    handles = [g.register_forward_hook(z_hook) for g in gates] if z_loss > 0 else []
    # NOTE: weight decay 0.1 as in the paper; it touches only the router rows (the only
    # parameters), pulling every row towards zero, i.e. towards uniform routing.
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, warmup_fraction))
    names = list(packed)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    try:
        with count_progress("router tuning", steps, enabled=progress) as advance:
            for _ in range(steps):
                src = torch.randint(len(names), (batch_size,), generator=gen)
                rows = [
                    packed[names[s]][torch.randint(len(packed[names[s]]), (1,), generator=gen)]
                    for s in src.tolist()
                ]
                ids = torch.cat(rows)  # (B, T)
                z_terms.clear()
                lm = model(input_ids=ids, labels=ids).loss
                loss = lm + z_loss * torch.stack(z_terms).mean() if z_terms else lm
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(lm.detach()))
                advance(1)
    finally:
        for h in handles:
            h.remove()

    def window(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    k = max(1, min(20, steps // 5))
    record: dict[str, Any] = {
        "trained": "router (every layer, all rows: r_pub and each r_i)",
        "base_model": str(model_dir),
        "steps": steps,
        "lr": lr,
        "schedule": f"linear warmup {warmup_fraction:.0%}, cosine to 0",
        "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": weight_decay},
        "z_loss": z_loss,
        "load_balancing_loss": 0.0,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "tokens": steps * batch_size * seq_len,
        "train_top_k": train_top_k or assembled_top_k,
        "top_k": assembled_top_k,
        "seed": seed,
        "sources": {n: {"documents": len(sources[n]), "sequences": len(packed[n])} for n in names},
        "documents_sha256": _digest_documents(sources),
        "lm_loss_first": round(window(losses[:k]), 4),
        "lm_loss_last": round(window(losses[-k:]), 4),
        **({"note": dict(note)} if note else {}),
    }
    routers = {family.moe_router_key(i): w.detach() for i, w in enumerate(params)}
    record["untuned_routers"] = UNTUNED_ROUTERS
    write_tuned_checkpoint(ckpt, routers, {**assembly, "router_tuning": record}, out)
    return record


def write_tuned_checkpoint(
    ckpt: Checkpoint, routers: Mapping[str, torch.Tensor], assembly: dict[str, Any], out: Path
) -> None:
    """Copy ``ckpt`` to ``out`` with only the tensors in ``routers`` replaced.

    Every other tensor is copied byte for byte from its source file, in the same file and
    order; non-weight files travel along (provenance included), ``model.sig`` does not (it
    signed the old bytes), and ``assembly.json`` is replaced by ``assembly``. The replaced
    tensors as they were are kept in :data:`UNTUNED_ROUTERS`.
    """
    missing = sorted(set(routers) - set(ckpt.tensors))
    if missing:
        raise UnsupportedModelError(f"{ckpt.path} has no router tensor {missing[0]!r}")
    weight_files = {*ckpt.weight_files, INDEX_FILE, SINGLE_FILE}
    with atomic_directory(out) as tmp:
        for p in sorted(ckpt.path.iterdir()):
            if p.name in weight_files or p.name in {ASSEMBLY_FILE, "model.sig"}:
                if p.name == INDEX_FILE:
                    shutil.copyfile(p, tmp / p.name)  # same tensor names in the same files
                continue
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
            else:
                shutil.copyfile(p, tmp / p.name)
        for file in ckpt.weight_files:
            infos = sorted(
                (i for i in ckpt.tensors.values() if i.path.name == file), key=lambda i: i.start
            )
            tensors = []
            for info in infos:
                if info.name in routers:
                    new = routers[info.name].to(TORCH_DTYPES[info.dtype]).cpu()
                    if tuple(new.shape) != info.shape:
                        raise UnsupportedModelError(f"{info.name}: tuned shape {tuple(new.shape)}")
                    tensors.append(
                        OutTensor(info.name, info.dtype, info.shape, data=tensor_bytes(new))
                    )
                else:
                    pieces = ((info.path, info.start, info.nbytes),)
                    tensors.append(OutTensor(info.name, info.dtype, info.shape, pieces=pieces))
            write_safetensors(tmp / file, tensors, read_header(ckpt.path / file).metadata)
        # NOTE: tuning rewrites every r_i, so an expert can no longer be rebuilt from its router
        # row alone; the untuned rows make the tuned model auditable against the bundles.
        (tmp / UNTUNED_ROUTERS).parent.mkdir()
        old = [ckpt.info(name) for name in sorted(routers)]
        write_safetensors(
            tmp / UNTUNED_ROUTERS,
            [
                OutTensor(i.name, i.dtype, i.shape, pieces=((i.path, i.start, i.nbytes),))
                for i in old
            ],
            {"format": "pt"},
        )
        write_json(tmp / ASSEMBLY_FILE, assembly)
