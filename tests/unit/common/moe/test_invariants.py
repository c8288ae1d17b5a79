"""The five invariants of DESIGN.md, held exactly on tiny models of both families."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import ExpertMeta, write_bundle
from flexfed.common.formats.checkpoint import Checkpoint
from flexfed.common.moe.assembly import ASSEMBLY_FILE, assemble
from flexfed.common.moe.optout import AssembledModel, masked_experts, optout
from flexfed.common.moe.training_model import (
    build_training_model,
    extract_expert,
    router_z_loss,
    trainable_parameters,
)

TOKENS = torch.tensor(
    [
        [72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100, 33],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    ]
)


def logits_of(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def test_zero_experts_equals_public_model(anchor: Anchor, tmp_path: Path) -> None:
    """Invariant 1: E=1, top-1 computes exactly what the dense public model computes."""
    record = assemble(anchor, [], tmp_path / "moe", top_k=4)
    assert record["num_experts"] == 1 and record["top_k"] == 1
    assert torch.equal(logits_of(tmp_path / "moe"), logits_of(anchor.path))


def test_identity_expert_changes_nothing(
    anchor: Anchor, tmp_path: Path, expert_factory: Callable[..., Path]
) -> None:
    """Invariant 2: an expert equal to the public FFN with r_i = r_pub changes nothing."""
    identity = expert_factory("same", seed=None)
    assemble(anchor, [identity], tmp_path / "moe", top_k=2)
    assert torch.equal(logits_of(tmp_path / "moe"), logits_of(anchor.path))


def test_frozen_tensors_bit_identical_after_optimizer_step(anchor: Anchor) -> None:
    """Invariant 3: only the new FFN, r_i and b_i move; everything else stays bit-identical."""
    model = build_training_model(anchor)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = anchor.shapes.num_layers
    assert len(trainable) == layers * 5  # gate/up/down of the new FFN, r_i, b_i
    assert all(".mlp.expert." in n or n.endswith((".mlp.router", ".mlp.bias")) for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(
        trainable_parameters(model), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0
    )
    for _ in range(2):
        out = model(TOKENS, labels=TOKENS)
        loss = out.loss + 1e-3 * router_z_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    ckpt = Checkpoint.open(anchor.path)
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), f"{name} did not train"
            continue
        assert p.grad is None
        assert torch.equal(p, before[name]), f"{name} moved"
    # ... and the frozen public weights are the anchor's bytes, not merely unchanged copies.
    for key in ckpt.tensors:
        if ".mlp." in key:
            layer, proj = key.split(".")[2], key.split(".")[4]
            mine = model.get_parameter(f"model.layers.{layer}.mlp.public.{proj}.weight")
        else:
            mine = model.get_parameter(key)
        assert torch.equal(mine, ckpt.tensor(key)), key


def test_optout_equals_assembly_without_that_expert(
    anchor: Anchor, tmp_path: Path, expert_factory: Callable[..., Path]
) -> None:
    """Invariant 4: optout(assemble(A, B, C), B) == assemble(A, C), byte for byte."""
    a, b, c = (expert_factory(org, seed=i + 1) for i, org in enumerate(["a", "b", "c"]))
    shard = 20_000  # several shards and an index, to hold the sharded path too
    assemble(anchor, [a, b, c], tmp_path / "abc", top_k=2, max_shard_bytes=shard)
    optout(tmp_path / "abc", ["b"], tmp_path / "abc-b", max_shard_bytes=shard)
    assemble(anchor, [a, c], tmp_path / "ac", top_k=2, max_shard_bytes=shard)

    files = sorted(
        p.relative_to(tmp_path / "ac") for p in (tmp_path / "ac").rglob("*") if p.is_file()
    )
    got = sorted(
        p.relative_to(tmp_path / "abc-b") for p in (tmp_path / "abc-b").rglob("*") if p.is_file()
    )
    assert files == got
    assert len([f for f in files if f.suffix == ".safetensors"]) > 1
    for rel in files:
        if rel.name == ASSEMBLY_FILE:
            continue
        assert (tmp_path / "ac" / rel).read_bytes() == (tmp_path / "abc-b" / rel).read_bytes(), rel
    record = AssembledModel(tmp_path / "abc-b").assembly
    assert [s["org"] for s in record["slots"]] == [None, "a", "c"]
    assert [s["org"] for s in record["removed"]] == ["b"]
    assert torch.equal(logits_of(tmp_path / "abc-b"), logits_of(tmp_path / "ac"))


def test_masking_a_loaded_model_equals_optout(
    anchor: Anchor, tmp_path: Path, expert_factory: Callable[..., Path]
) -> None:
    """Serving-time masking computes exactly what the opted-out checkpoint computes."""
    a, b, c = (expert_factory(org, seed=i + 1) for i, org in enumerate(["a", "b", "c"]))
    assemble(anchor, [a, b, c], tmp_path / "abc", top_k=3)
    assemble(anchor, [a, c], tmp_path / "ac", top_k=3)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "abc").eval()
    with torch.no_grad():
        full = model(TOKENS).logits
        with masked_experts(model, [2]):
            masked = model(TOKENS).logits
        again = model(TOKENS).logits
    assert torch.equal(masked, logits_of(tmp_path / "ac"))
    assert torch.equal(again, full)
    assert not torch.equal(masked, full)


def test_assembled_checkpoint_reloads_and_generates(
    anchor: Anchor, tmp_path: Path, expert_factory: Callable[..., Path]
) -> None:
    """Invariant 5: AutoModelForCausalLM loads the assembled model and generate() works."""
    experts = [expert_factory(org, seed=i + 1) for i, org in enumerate(["a", "b"])]
    assemble(anchor, experts, tmp_path / "moe", top_k=2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(model).__name__ == anchor.family.moe_architecture
    out = model.generate(TOKENS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=257)
    assert out.shape == (2, 9)


def test_training_model_matches_assembled_single_expert(
    anchor: Anchor, tmp_path: Path, meta_for: Callable[..., ExpertMeta]
) -> None:
    """The 2-expert training model and the assembled (public + expert) model agree.

    Not bit-exact (different kernels), but the same function: the bias is 0, so both route
    the same way.
    """
    torch.manual_seed(0)
    model = build_training_model(anchor)
    with torch.no_grad():
        for p in trainable_parameters(model):
            if p.numel() > 1:
                p.add_(torch.randn_like(p) * 0.05)
        write_bundle(tmp_path / "e", extract_expert(model), meta_for("x"), anchor)
        assemble(anchor, [tmp_path / "e"], tmp_path / "moe", top_k=2)
        mine = model(TOKENS).logits
    theirs = logits_of(tmp_path / "moe")
    assert torch.allclose(mine, theirs, atol=1e-5), (mine - theirs).abs().max()
