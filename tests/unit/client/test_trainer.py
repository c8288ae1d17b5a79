"""The local expert trainer: the paper's recipe, frozen tensors, gains, resume, clear errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from flexfed.client.trainer import state_dir_for, train_expert
from flexfed.common.errors import (
    ConfigError,
    DataError,
    DeviceError,
    MissingFileError,
    UnsupportedModelError,
)
from flexfed.common.formats.anchor import Anchor, create_anchor
from flexfed.common.formats.checkpoint import Checkpoint
from flexfed.common.formats.safetensors_io import load_tensors
from flexfed.common.moe.assembly import assemble
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.recipe import batch_indices
from flexfed.common.public.tiny import build_public_model

FLEXFED = str(Path(sys.executable).parent / "flexfed")


def arithmetic_corpus(path: Path, n: int = 400, seed: int = 0) -> Path:
    """A synthetic domain clearly unlike anything else: sums, one per line."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f'{{"text": "{a}+{b}={a + b}; {b}+{a}={a + b}."}}')
    path.write_text("\n".join(lines) + "\n")
    return path


QUICK = TrainConfig(
    seq_len=32, batch_size=8, max_steps=6, lr=3e-3, checkpoint_every=3, eval_batches=4
)


def test_frozen_tensors_bit_identical_after_training(anchor: Anchor, tmp_path: Path) -> None:
    """Invariant 3, through the real trainer, on both families."""
    data = arithmetic_corpus(tmp_path / "sums.jsonl")
    result = train_expert(anchor.path, [data], "acme", tmp_path / "expert", QUICK, progress=False)
    assert result.model is not None
    ckpt = Checkpoint.open(anchor.path)
    named = dict(result.model.named_parameters())
    for key in ckpt.tensors:
        if ".mlp." in key:
            layer, proj = key.split(".")[2], key.split(".")[4]
            key_in_model = f"model.layers.{layer}.mlp.public.{proj}.weight"
        else:
            key_in_model = key
        assert torch.equal(named[key_in_model].detach(), ckpt.tensor(key)), key
    for layer in range(anchor.shapes.num_layers):
        assert torch.equal(
            named[f"model.layers.{layer}.mlp.router_pub"].detach(), anchor.r_pub(layer)
        )
    # ... and the bundle holds exactly the trained tensors.
    weights = load_tensors(tmp_path / "expert" / "expert.safetensors")
    assert torch.equal(
        weights["layers.0.gate_proj.weight"],
        named["model.layers.0.mlp.expert.gate_proj.weight"].detach(),
    )
    assert not state_dir_for(tmp_path / "expert").exists()


def pretrained_anchor(tmp_path: Path) -> Anchor:
    """A tiny olmo2 public model pre-trained on Python source (the 'public data')."""
    import inspect
    import json

    from flexfed.client.trainer import load_tokenizer
    from flexfed.common.data.packing import pack_documents
    from flexfed.common.moe.recipe import train_dense
    from flexfed.common.public.tiny import build_public_model

    public = tmp_path / "public"
    model = build_public_model("olmo2", public, seed=0, hidden_size=64, intermediate_size=128)
    docs = [
        inspect.getsource(m) for m in (json.decoder, json.encoder, json.scanner, random, inspect)
    ]
    draft = create_anchor(public, tmp_path / "draft", [torch.zeros(64)] * 2, {"kind": "zeros"})
    packed = pack_documents(docs, load_tokenizer(draft), 64, 0.0)
    train_dense(model, packed.train, TrainConfig(seq_len=64, batch_size=16, max_steps=150, lr=3e-3))
    model.save_pretrained(public)
    return create_anchor(public, tmp_path / "anchor", [torch.zeros(64)] * 2, {"kind": "zeros"})


@pytest.mark.slow
def test_expert_learns_its_domain_and_the_assembly_keeps_it(tmp_path: Path) -> None:
    """Held-out loss on a domain unlike the public data falls well below the public model's,
    and the assembled MoE (public + expert) keeps that gain."""
    from flexfed.client.trainer import load_tokenizer
    from flexfed.common.data.documents import read_documents
    from flexfed.common.data.packing import pack_documents

    anchor = pretrained_anchor(tmp_path)
    data = arithmetic_corpus(tmp_path / "sums.jsonl", n=1500)
    cfg = TrainConfig(seq_len=64, batch_size=16, max_steps=100, lr=3e-3, eval_batches=8)
    result = train_expert(anchor.path, [data], "acme", tmp_path / "expert", cfg, progress=False)
    # FFN-only training of a 64-wide model gains ~1.8 nats here (a full FFN-only fine-tune of
    # the dense model reaches the same loss): frozen embeddings and lm_head bound the gain.
    assert result.val_loss_expert < result.val_loss_public - 1.0, result

    assemble(anchor, [tmp_path / "expert"], tmp_path / "moe", top_k=2)
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    dense = AutoModelForCausalLM.from_pretrained(anchor.path).eval()
    packed = pack_documents(read_documents([data]), load_tokenizer(anchor), 64, 0.05)
    with torch.no_grad():
        moe_loss = float(moe(input_ids=packed.val, labels=packed.val).loss)
        pub_loss = float(dense(input_ids=packed.val, labels=packed.val).loss)
    gain_expert = result.val_loss_public - result.val_loss_expert
    assert pub_loss - moe_loss > 0.8 * gain_expert, (pub_loss, moe_loss, result)


def test_data_order_is_a_function_of_seed_and_step() -> None:
    assert torch.equal(batch_indices(7, 8, 50, 3), batch_indices(7, 8, 50, 3))
    epoch = torch.cat([batch_indices(s, 5, 20, 1) for s in range(4)])
    assert sorted(epoch.tolist()) == list(range(20))  # every sequence once per epoch


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1e-3)
    assert cfg.lr_at(0) < cfg.lr_at(5) < cfg.lr_at(10)
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(100) == pytest.approx(1e-4)  # decays to 0.1 x peak
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 100))


def _train_cmd(anchor: Path, data: Path, out: Path, steps: int) -> list[str]:
    return [
        FLEXFED,
        "client",
        "train",
        "--public",
        str(anchor),
        "--data",
        str(data),
        "--org",
        "acme",
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "4",
        "--device",
        "cpu",
        "--seed",
        "7",
        "--quiet",
    ]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    """kill -9 mid-run, rerun the same command: the expert equals an uninterrupted run's."""
    public = tmp_path / "public"
    build_public_model(
        "olmo2", public, seed=0, hidden_size=64, intermediate_size=256, num_hidden_layers=4
    )
    anchor = create_anchor(public, tmp_path / "anchor", [torch.zeros(64)] * 4, {"kind": "zeros"})
    data = arithmetic_corpus(tmp_path / "sums.jsonl", n=1500)
    steps = 40
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    subprocess.run(_train_cmd(anchor.path, data, tmp_path / "straight", steps), check=True, env=env)

    out = tmp_path / "resumed"
    proc = subprocess.Popen(_train_cmd(anchor.path, data, out, steps), env=env)
    progress = state_dir_for(out) / "latest" / "progress.json"
    deadline = time.monotonic() + 120
    while not progress.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written is visible

    rerun = subprocess.run(
        _train_cmd(anchor.path, data, out, steps),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "resumed at step" in rerun.stdout
    a = load_tensors(tmp_path / "straight" / "expert.safetensors")
    b = load_tensors(out / "expert.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- clear errors --------------------------------------------------------------------------


def test_empty_data_is_a_clear_error(anchor: Anchor, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.txt").write_text("")
    with pytest.raises(DataError):
        train_expert(
            anchor.path, [tmp_path / "data"], "acme", tmp_path / "out", QUICK, progress=False
        )
    assert not (tmp_path / "out").exists()


def test_missing_data_is_a_clear_error(anchor: Anchor, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist|not found|no such"):
        train_expert(
            anchor.path, [tmp_path / "nope.txt"], "acme", tmp_path / "out", QUICK, progress=False
        )


def test_unsupported_family_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100)).save_pretrained(
        tmp_path / "gpt2"
    )
    data = arithmetic_corpus(tmp_path / "sums.jsonl")
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        train_expert(tmp_path / "gpt2", [data], "acme", tmp_path / "out", QUICK, progress=False)


def test_missing_tokenizer_is_a_clear_error(anchor: Anchor, tmp_path: Path) -> None:
    import shutil

    from flexfed.common.formats.anchor import open_anchor

    copy = tmp_path / "anchor"
    shutil.copytree(anchor.path, copy)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (copy / name).unlink()
    data = arithmetic_corpus(tmp_path / "sums.jsonl")
    # The anchor's digest changes with its files, which is fine: it is a different anchor now.
    open_anchor(copy)
    with pytest.raises(MissingFileError, match="tokenizer"):
        train_expert(copy, [data], "acme", tmp_path / "out", QUICK, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error(anchor: Anchor, tmp_path: Path) -> None:
    data = arithmetic_corpus(tmp_path / "sums.jsonl")
    cfg = TrainConfig(seq_len=32, max_steps=2, device="cuda")
    with pytest.raises(DeviceError, match="CUDA"):
        train_expert(anchor.path, [data], "acme", tmp_path / "out", cfg, progress=False)


def test_unwritable_output_is_a_clear_error(anchor: Anchor, tmp_path: Path) -> None:
    data = arithmetic_corpus(tmp_path / "sums.jsonl")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write"):
        train_expert(anchor.path, [data], "acme", blocker / "out", QUICK, progress=False)


def test_cli_reports_errors_in_one_line(anchor: Anchor, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            FLEXFED,
            "client",
            "train",
            "--public",
            str(anchor.path),
            "--data",
            str(tmp_path / "nope"),
            "--org",
            "acme",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == DataError.exit_code
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("flexfed: error:")


@pytest.mark.parametrize(
    "variant",
    [
        {"micro_batch_size": 4},  # gradient accumulation over 2 micro-batches
        {"activation_checkpointing": True},
    ],
    ids=["grad-accumulation", "activation-checkpointing"],
)
def test_memory_saving_options_train_the_same_expert(
    anchor: Anchor, tmp_path: Path, variant: dict[str, object]
) -> None:
    """Accumulation and activation checkpointing change memory use, not the result."""
    from dataclasses import replace

    data = arithmetic_corpus(tmp_path / "sums.jsonl")
    base = train_expert(anchor.path, [data], "acme", tmp_path / "base", QUICK, progress=False)
    other = train_expert(
        anchor.path, [data], "acme", tmp_path / "other", replace(QUICK, **variant), progress=False
    )
    a = load_tensors(tmp_path / "base" / "expert.safetensors")
    b = load_tensors(tmp_path / "other" / "expert.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert other.val_loss_expert == pytest.approx(base.val_loss_expert, abs=1e-4)
