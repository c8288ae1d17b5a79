"""Per-request expert sets: the policy, and a served mask equal to opt-out, bit for bit.

Protects: ``flexfed serve``'s promise that a request excluding experts gets exactly the logits
of ``flexfed optout --drop`` of those experts (both families, concurrent requests with
different sets, the model restored after each), and the policy's parsing and refusals.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_meta
from transformers import AutoModelForCausalLM

from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import write_bundle
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.optout import optout
from flexfed.common.moe.training_model import build_training_model, extract_expert
from flexfed.common.serving.generation import Engine, Sampling
from flexfed.common.serving.policy import ExpertPolicy, PolicyError, Slot

TOKENS = torch.tensor([[72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33]])

SLOTS = [
    Slot(0, None, "public", None),
    Slot(1, "acme", "math", "open"),
    Slot(2, "globex", "code", "research-only"),
    Slot(3, "initech", "news", "open"),
]


def logits_of(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits


# --- the policy ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_body", "dropped"),
    [
        (None, ()),
        ({}, ()),
        ({"exclude_orgs": ["globex"]}, (2,)),
        ({"exclude_orgs": ["acme", "initech"]}, (1, 3)),
        ({"include_orgs": ["globex"]}, (1, 3)),
        ({"licenses": ["open"]}, (2,)),
        ({"licenses": ["research-only"], "exclude_orgs": ["globex"]}, (1, 2, 3)),
        ({"include_orgs": ["acme", "globex"], "licenses": ["open"]}, (2, 3)),
    ],
)
def test_policy_drops_the_right_slots(request_body: object, dropped: tuple[int, ...]) -> None:
    assert ExpertPolicy.from_request(request_body).drop_slots(SLOTS) == dropped


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"exclude_orgs": ["nobody"]}, "no expert of nobody"),
        ({"include_orgs": ["acme", "umbrella"]}, "no expert of umbrella"),
        ({"exclude_orgs": "acme"}, "must be a list of non-empty strings"),
        ({"exclude_orgs": [""]}, "must be a list of non-empty strings"),
        ({"licenses": [3]}, "must be a list of non-empty strings"),
        ({"drop": ["acme"]}, 'unknown field(s) in "flexfed": drop'),
        (["acme"], '"flexfed" must be an object'),
    ],
)
def test_policy_refuses_bad_requests(request_body: object, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExpertPolicy.from_request(request_body).drop_slots(SLOTS)


def test_a_request_cannot_loosen_the_servers_restrictions() -> None:
    server = ExpertPolicy(exclude_orgs=("acme",), licenses=("open",))
    asked = ExpertPolicy.from_request({"include_orgs": ["acme", "globex"]})
    assert server.merged(asked).drop_slots(SLOTS) == (1, 2, 3)
    assert server.merged(ExpertPolicy()).drop_slots(SLOTS) == (1, 2)


def test_the_public_expert_is_never_dropped() -> None:
    assert 0 not in ExpertPolicy(include_orgs=("acme",), licenses=("none",)).drop_slots(SLOTS)


# --- the served mask is opt-out ------------------------------------------------------------


@pytest.fixture
def three_experts(anchor: Anchor, tmp_path: Path) -> Path:
    """public + acme (open) + globex (research-only) + initech (open), top-2."""
    dirs = []
    for seed, (org, lic) in enumerate(
        [("acme", "open"), ("globex", "research-only"), ("initech", "open")], start=1
    ):
        model = build_training_model(anchor)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        meta = replace(make_meta(anchor, org), license=lic)
        dirs.append(write_bundle(tmp_path / "experts" / org, extract_expert(model), meta, anchor))
    assemble(anchor, dirs, tmp_path / "moe", top_k=2)
    return tmp_path / "moe"


@pytest.mark.parametrize(
    ("policy", "drop"),
    [
        ({"exclude_orgs": ["globex"]}, ["globex"]),
        ({"include_orgs": ["globex"]}, ["acme", "initech"]),
        ({"licenses": ["open"]}, ["globex"]),
        ({"exclude_orgs": ["acme", "globex", "initech"]}, ["acme", "globex", "initech"]),
    ],
)
def test_serving_with_experts_excluded_equals_optout(
    three_experts: Path, tmp_path: Path, policy: dict[str, list[str]], drop: list[str]
) -> None:
    optout(three_experts, drop, tmp_path / "opted-out")
    engine = Engine(three_experts, device="cpu")
    full = engine.logits(TOKENS, ExpertPolicy())
    served = engine.logits(TOKENS, ExpertPolicy.from_request(policy))
    assert torch.equal(served, logits_of(tmp_path / "opted-out"))
    assert not torch.equal(served, full)
    assert torch.equal(engine.logits(TOKENS, ExpertPolicy()), full)  # restored
    assert torch.equal(full, logits_of(three_experts))


def test_the_servers_default_exclusion_equals_optout(three_experts: Path, tmp_path: Path) -> None:
    optout(three_experts, ["initech"], tmp_path / "no-initech")
    engine = Engine(three_experts, device="cpu", default=ExpertPolicy(exclude_orgs=("initech",)))
    assert torch.equal(engine.logits(TOKENS, ExpertPolicy()), logits_of(tmp_path / "no-initech"))


def test_concurrent_requests_with_different_sets(three_experts: Path, tmp_path: Path) -> None:
    """Requests racing from threads each get their own expert set's logits, exactly."""
    optout(three_experts, ["globex"], tmp_path / "no-globex")
    expected = {
        "all": logits_of(three_experts),
        "no-globex": logits_of(tmp_path / "no-globex"),
    }
    engine = Engine(three_experts, device="cpu")
    policies = {"all": ExpertPolicy(), "no-globex": ExpertPolicy(exclude_orgs=("globex",))}
    failures: list[str] = []

    def worker(kind: str) -> None:
        for _ in range(5):
            if not torch.equal(engine.logits(TOKENS, policies[kind]), expected[kind]):
                failures.append(kind)

    threads = [threading.Thread(target=worker, args=(k,)) for k in ["all", "no-globex"] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_greedy_completion_matches_the_opted_out_model(three_experts: Path, tmp_path: Path) -> None:
    optout(three_experts, ["acme"], tmp_path / "no-acme")
    engine = Engine(three_experts, device="cpu")
    got = engine.complete("Hello", Sampling(max_tokens=6), ExpertPolicy(exclude_orgs=("acme",)))
    assert got.experts == ("public", "globex/expert", "initech/expert")
    assert got.prompt_tokens == 5 and got.completion_tokens == 6 and got.finish_reason == "length"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "no-acme", dtype=torch.float32)
    ids = engine.tokenizer("Hello", return_tensors="pt").input_ids
    out = model.eval().generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=257)
    assert got.text == engine.tokenizer.decode(out[0, 5:], skip_special_tokens=True)


def test_a_dense_model_is_refused(anchor: Anchor) -> None:
    with pytest.raises(Exception, match="dense model, not an assembled MoE model"):
        Engine(anchor.path, device="cpu")


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 5000}]
)
def test_bad_sampling_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(PolicyError):
        Sampling(**kwargs)  # type: ignore[arg-type]
