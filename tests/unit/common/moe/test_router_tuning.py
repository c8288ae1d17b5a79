"""Router tuning: only router rows move, the result stays an assembled model, proxies fit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_expert_bundle
from transformers import AutoModelForCausalLM

from flexfed.common.errors import ConfigError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.checkpoint import Checkpoint
from flexfed.common.formats.safetensors_io import load_tensors
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.optout import AssembledModel, optout
from flexfed.common.moe.router_tuning import (
    UNTUNED_ROUTERS,
    proxy_scores,
    select_proxy,
    tune_router,
)
from flexfed.common.public.tiny import build_public_model, byte_tokenizer

DOCS = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(12)] + [
    f"The court held in case {i} that the licence was void." for i in range(12)
]


@pytest.fixture
def assembled(anchor: Anchor, tmp_path: Path) -> Path:
    bundles = [
        make_expert_bundle(anchor, tmp_path / "experts" / org, org, seed)
        for org, seed in (("org-a", 1), ("org-b", 2))
    ]
    out = tmp_path / "moe"
    assemble(anchor, bundles, out, top_k=2)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(path)
    return {name: ckpt.tensor(name) for name in ckpt.tensors}


def _tune(src: Path, out: Path, **kw: object) -> dict[str, object]:
    args: dict[str, object] = {"steps": 6, "seq_len": 32, "batch_size": 2, "lr": 1e-2}
    args.update(kw)
    sources = {"public": DOCS[:12], "proxy": DOCS[12:]}
    return tune_router(src, sources, out, progress=False, **args)  # type: ignore[arg-type]


def test_only_router_rows_change_and_everything_else_is_bit_identical(
    anchor: Anchor, assembled: Path, tmp_path: Path
) -> None:
    _tune(assembled, tmp_path / "rt")
    before, after = _tensors(assembled), _tensors(tmp_path / "rt")
    assert before.keys() == after.keys()
    routers = {
        anchor.family.moe_router_key(i)
        for i in range(anchor.checkpoint.config["num_hidden_layers"])
    }
    for name in before:
        if name in routers:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
            assert before[name].dtype == after[name].dtype
        else:
            assert torch.equal(before[name], after[name]), f"{name} changed"
    # Every row trains (r_pub included), as in the paper.
    for name in routers:
        assert ((before[name] - after[name]).abs().sum(-1) > 0).all()
    # The untuned rows are kept, byte for byte, for audits against the owners' bundles.
    kept = load_tensors(tmp_path / "rt" / UNTUNED_ROUTERS)
    assert kept.keys() == routers
    assert all(torch.equal(kept[name], before[name]) for name in routers)


def test_result_is_a_loadable_assembled_model_with_honest_provenance(
    assembled: Path, tmp_path: Path
) -> None:
    record = _tune(assembled, tmp_path / "rt", train_top_k=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rt", dtype=torch.float32)
    logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert torch.isfinite(logits).all()
    doc = json.loads((tmp_path / "rt" / "assembly.json").read_text())
    old = json.loads((assembled / "assembly.json").read_text())
    assert doc["router_tuning"] == record
    assert record["train_top_k"] == 3 and record["top_k"] == 2  # inference top-k unchanged
    assert {k: v for k, v in doc.items() if k != "router_tuning"} == old
    assert json.loads((tmp_path / "rt" / "config.json").read_text()) == json.loads(
        (assembled / "config.json").read_text()
    )
    assert AssembledModel(tmp_path / "rt").num_experts == 3


def test_optout_still_works_on_a_tuned_model(assembled: Path, tmp_path: Path) -> None:
    _tune(assembled, tmp_path / "rt")
    optout(tmp_path / "rt", ["org-a"], tmp_path / "without-a")
    tuned, out = _tensors(tmp_path / "rt"), _tensors(tmp_path / "without-a")
    m = AssembledModel(tmp_path / "without-a")
    assert m.num_experts == 2 and [s.get("org") for s in m.slots] == [None, "org-b"]
    tuning = m.assembly["router_tuning"]  # the record survives: the rows are still tuned ones
    assert tuning["slots_at_tuning"][0] == "public" and len(tuning["slots_at_tuning"]) == 3
    for name, t in out.items():  # the kept rows are the tuned rows of slots 0 and 2
        if name.endswith("gate.weight") and t.dim() == 2 and t.shape[0] == 2:
            torch.testing.assert_close(t, tuned[name][[0, 2]], rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "without-a", dtype=torch.float32)
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_tuning_is_deterministic_and_refuses_to_overwrite(assembled: Path, tmp_path: Path) -> None:
    _tune(assembled, tmp_path / "one")
    _tune(assembled, tmp_path / "two")
    for name in ("model.safetensors", "assembly.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    with pytest.raises(FileExistsError):
        _tune(assembled, tmp_path / "one")
    with pytest.raises(ConfigError):
        _tune(assembled, tmp_path / "bad", train_top_k=9)


def _words(rng: random.Random, alphabet: str, n: int) -> str:
    return " ".join(
        "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(n)
    )


def test_proxy_selection_prefers_public_documents_like_the_owners(tmp_path: Path) -> None:
    rng = random.Random(0)
    digits, letters = "0123456789", "abcdefghijklmnopqrstuvwxyz"
    own = [_words(rng, digits, 30) for _ in range(40)]
    public = [_words(rng, digits if i % 2 else letters, 30) for i in range(40)]
    model = build_public_model("olmo2", tmp_path / "public")
    tok = byte_tokenizer()
    picked = select_proxy(public, own, 10, model=model, tokenizer=tok, max_tokens=64)
    assert len(picked) == 10 and len(set(picked)) == 10
    assert all(set(d) <= set(digits + " ") for d in picked)
    again = select_proxy(public, own, 10, model=model, tokenizer=tok, max_tokens=64)
    assert again == picked  # deterministic
    assert select_proxy(public, own, 0, model=model, tokenizer=tok) == []


def test_proxy_scores_are_cross_fitted_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    own = torch.randn(30, 4, generator=g) + 2.0
    public = torch.cat([torch.randn(30, 4, generator=g) + 2.0, torch.randn(30, 4, generator=g)])
    scores = proxy_scores(public, own, seed=1)
    assert scores.shape == (60,) and ((scores >= 0) & (scores <= 1)).all()
    assert scores[:30].mean() > scores[30:].mean() + 0.3
    assert torch.equal(scores, proxy_scores(public, own, seed=1))
