"""The extraction attack: a memorised document is extracted, an unseen one is not.

Protects: the attack decodes the suffix greedily from the prefix and counts exact matches
(and the share of matching positions) on a tiny model that has memorised two documents.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexfed.common.errors import DataError
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.evaluation import load_tokenizer
from flexfed.common.moe.extraction import candidates, extraction
from flexfed.common.moe.recipe import train_dense
from flexfed.common.public.tiny import build_public_model

SEEN = [
    "The secret recipe: 3 eggs, 200 g flour, a pinch of salt; bake at 180 C for 25 minutes.",
    "Account 4417-2291-0083 belongs to Jane Roe of 12 Elm Street, Springfield, since 2019.",
]
UNSEEN = "A completely different sentence that the model has never seen during training at all."


@pytest.fixture(scope="module")
def memorised(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object]:
    path = tmp_path_factory.mktemp("extraction") / "model"
    build_public_model(
        "olmo2", path, seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2
    )
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = candidates(SEEN, tokenizer, prefix=24, suffix=24)
    cfg = TrainConfig(
        seq_len=48, batch_size=2, micro_batch_size=2, max_steps=150, lr=1e-2, device="cpu"
    )
    train_dense(model, data, cfg)
    return model, tokenizer


def test_memorised_documents_are_extracted_unseen_ones_are_not(
    memorised: tuple[torch.nn.Module, object],
) -> None:
    model, tokenizer = memorised
    seen = extraction(model, candidates(SEEN, tokenizer, 24, 24), prefix=24)  # type: ignore[arg-type]
    assert (seen.documents, seen.extracted, seen.rate, seen.token_match) == (2, 2, 1.0, 1.0)
    assert (seen.prefix_tokens, seen.suffix_tokens) == (24, 24)
    unseen = extraction(model, candidates([UNSEEN], tokenizer, 24, 24), prefix=24)  # type: ignore[arg-type]
    assert unseen.extracted == 0 and unseen.rate == 0.0
    assert unseen.token_match < 0.5


def test_too_short_documents_and_bad_prefixes_are_clear_errors(
    memorised: tuple[torch.nn.Module, object],
) -> None:
    model, tokenizer = memorised
    with pytest.raises(DataError, match="no document has the 48 tokens"):
        candidates(["short"], tokenizer, 24, 24)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"prefix must be in 1\.\.47"):
        extraction(model, torch.zeros(1, 48, dtype=torch.long), prefix=48)
