"""Router embeddings: r_pub and every r_i come out of one function, on one scale."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flexfed.common.errors import InvalidInputError
from flexfed.common.moe.router_init import DEFAULT_NORM, mlp_input_means
from flexfed.common.public.tiny import build_public_model, byte_tokenizer

DOCS = ["def f(x):\n    return x + 1\n", "Compute 12 + 30. Answer: 42.", "Permission is granted."]


@pytest.mark.parametrize("family", ["olmo2", "llama"])
def test_vectors_have_unit_norm_by_default_and_keep_the_raw_direction(
    family: str, tmp_path: Path
) -> None:
    model = build_public_model(family, tmp_path / family)
    tok = byte_tokenizer()
    unit = mlp_input_means(model, tok, DOCS)
    raw = mlp_input_means(model, tok, DOCS, norm=None)
    twice = mlp_input_means(model, tok, DOCS, norm=2.0)
    assert len(unit) == len(raw) == model.config.num_hidden_layers
    for u, r, t in zip(unit, raw, twice, strict=True):
        assert u.shape == (model.config.hidden_size,) and u.dtype == torch.float32
        assert torch.linalg.vector_norm(u).item() == pytest.approx(DEFAULT_NORM, rel=1e-5)
        torch.testing.assert_close(u, r / torch.linalg.vector_norm(r))
        torch.testing.assert_close(t, 2.0 * u)


@pytest.mark.parametrize("norm", [0.0, -1.0, float("nan")])
def test_a_norm_that_is_not_positive_is_refused(norm: float, tmp_path: Path) -> None:
    model = build_public_model("olmo2", tmp_path / "m")
    with pytest.raises(InvalidInputError, match="norm"):
        mlp_input_means(model, byte_tokenizer(), DOCS, norm=norm)
