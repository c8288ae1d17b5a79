"""Tiny public models built in code: for tests, quick demos and benchmarks. No downloads.

:func:`byte_tokenizer` is a byte-level tokenizer (256 byte tokens + end-of-text + pad) that
needs no training; :func:`build_public_model` writes a randomly initialised dense checkpoint of
either family with that tokenizer; :func:`build_anchor` also makes it an anchor.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from flexfed.common.errors import UnsupportedModelError
from flexfed.common.formats.anchor import Anchor, create_anchor

EOS = "<|endoftext|>"
PAD = "<|pad|>"
BYTE_VOCAB = 258


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every UTF-8 byte is a token; ids 256/257 are EOS/pad."""
    vocab = dict(_BYTE_ORDER)  # ByteLevel's printable stand-in character -> its byte value
    vocab[EOS] = 256
    vocab[PAD] = 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


def _bytes_to_unicode() -> dict[str, int]:
    # The GPT-2 byte<->unicode table that ByteLevel uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_ORDER = _bytes_to_unicode()


def tiny_config(family: str, **overrides: Any) -> Olmo2Config | LlamaConfig:
    """A small dense config of a supported family (defaults: 2 layers, hidden 32)."""
    common: dict[str, Any] = {
        "vocab_size": BYTE_VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "eos_token_id": 256,
        "pad_token_id": 257,
        "bos_token_id": None,
        "tie_word_embeddings": False,
    }
    common.update(overrides)
    if family == "olmo2":
        return Olmo2Config(**common)
    if family == "llama":
        common.setdefault("num_key_value_heads", max(1, common["num_attention_heads"] // 2))
        return LlamaConfig(**common)
    raise UnsupportedModelError(f"no tiny config for family {family!r}")


def build_public_model(
    family: str,
    out: Path | str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: PreTrainedTokenizerFast | None = None,
    **overrides: Any,
) -> PreTrainedModel:
    """Write a randomly initialised dense model of ``family`` (byte tokenizer by default)."""
    torch.manual_seed(seed)
    tokenizer = tokenizer or byte_tokenizer()
    overrides.setdefault("vocab_size", len(tokenizer))
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    config = tiny_config(family, **overrides)
    model: PreTrainedModel = (
        Olmo2ForCausalLM(config) if isinstance(config, Olmo2Config) else LlamaForCausalLM(config)
    )
    model.to(dtype).eval()  # type: ignore[arg-type]  # transformers' @wraps'd .to
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model


def build_anchor(
    family: str,
    out: Path | str,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Anchor:
    """A tiny random anchor; r_pub is a seeded random vector per layer."""
    with tempfile.TemporaryDirectory() as tmp:
        model = build_public_model(family, tmp, seed, dtype, **overrides)
        g = torch.Generator().manual_seed(seed + 1)
        hidden = model.config.hidden_size
        r_pub = [
            torch.randn(hidden, generator=g) * 0.02 for _ in range(model.config.num_hidden_layers)
        ]
        return create_anchor(tmp, out, r_pub, {"kind": "random", "seed": seed})


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained locally (seconds for a few MB of text)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOS, PAD],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
