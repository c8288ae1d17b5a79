"""Held-out evaluation and routing statistics of dense and assembled checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from flexfed.common.formats.anchor import Anchor
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.evaluation import evaluate_model, routing_statistics

DOCS = {
    "sums": [f"{a}+{a}={2 * a}. " * 20 for a in range(40)],
    "words": ["the quick brown fox jumps over the lazy dog. " * 10 for _ in range(20)],
}


def test_identity_expert_evaluates_like_the_public_model(
    anchor: Anchor, tmp_path: Path, expert_factory: Callable[..., Path]
) -> None:
    assemble(anchor, [expert_factory("same", seed=None)], tmp_path / "moe", top_k=2)
    dense = evaluate_model(anchor.path, DOCS, seq_len=32, max_sequences=4, progress=False)
    moe = evaluate_model(tmp_path / "moe", DOCS, seq_len=32, max_sequences=4, progress=False)
    for name in DOCS:
        assert moe[name]["loss"] == dense[name]["loss"]
        assert dense[name]["ppl"] == pytest.approx(2.718281828 ** dense[name]["loss"])
        assert dense[name]["tokens"] == 4 * 31


def test_routing_statistics_are_probabilities(
    anchor: Anchor, tmp_path: Path, expert_factory: Callable[..., Path]
) -> None:
    experts = [expert_factory(org, seed=i + 1) for i, org in enumerate(["a", "b"])]
    assemble(anchor, experts, tmp_path / "moe", top_k=2)
    stats = routing_statistics(tmp_path / "moe", DOCS, seq_len=32, max_sequences=4)
    assert stats["experts"] == 3 and stats["layers"] == anchor.shapes.num_layers
    for rows in stats["probs"].values():
        for row in rows:
            assert sum(row) == pytest.approx(1.0) and all(p >= 0 for p in row)


def test_eval_cli_writes_table_json_and_heatmap(
    anchor: Anchor, tmp_path: Path, expert_factory: Callable[..., Path]
) -> None:
    assemble(anchor, [expert_factory("a")], tmp_path / "moe", top_k=2)
    data = tmp_path / "sums.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in DOCS["sums"]) + "\n")
    flexfed = str(Path(sys.executable).parent / "flexfed")
    proc = subprocess.run(
        [
            flexfed,
            "eval",
            "--model",
            str(tmp_path / "moe"),
            "--data",
            f"arith={data}",
            "--seq-len",
            "32",
            "--max-sequences",
            "4",
            "--json",
            str(tmp_path / "e.json"),
            "--routing",
            str(tmp_path / "r.png"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "arith" in proc.stdout
    doc = json.loads((tmp_path / "e.json").read_text())
    assert doc["domains"]["arith"]["loss"] > 0 and "routing" in doc
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
