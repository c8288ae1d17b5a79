"""Data-parallel expert training under torchrun (DDP; gloo on CPU, 2 processes).

Two processes sharing each global batch must train the expert that one process trains on the
same data, seed and global batch. Not bit for bit: the all-reduce sums the two processes'
gradients in another order than one process accumulates its micro-batches, and float addition
is not associative, so the tensors agree to float32 reduction-order tolerance (~1e-8 here).
The single-process run itself stays bit-exact (tests/unit/client/test_trainer.py).

This file is also the worker script of two tests: torchrun runs it with ``grad`` or ``fail``.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from flexfed.client import trainer
from flexfed.client.parallel import per_process_batch
from flexfed.client.trainer import state_dir_for, train_expert
from flexfed.common.errors import ConfigError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.bundle import validate_bundle
from flexfed.common.formats.checkpoint import Checkpoint
from flexfed.common.formats.safetensors_io import load_tensors
from flexfed.common.moe.config import TrainConfig
from flexfed.common.public.tiny import build_anchor

FLEXFED = str(Path(sys.executable).parent / "flexfed")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Reduction-order tolerance: observed differences are ~1e-8 after 6 AdamW steps.
ATOL, RTOL = 1e-5, 1e-5

# One global batch of 8 sequences; each of the 2 processes runs its 4 in 2 micro-batches of 2
# (so no_sync() accumulation is exercised), checkpoints every 2 steps from rank 0.
CFG = TrainConfig(
    seq_len=32,
    batch_size=8,
    micro_batch_size=2,
    max_steps=6,
    lr=3e-3,
    checkpoint_every=2,
    seed=3,
    device="cpu",
)
CLI_ARGS = shlex.split(
    f"--seq-len {CFG.seq_len} --batch-size {CFG.batch_size} --micro-batch-size "
    f"{CFG.micro_batch_size} --max-steps {CFG.max_steps} --lr {CFG.lr} --checkpoint-every "
    f"{CFG.checkpoint_every} --seed {CFG.seed} --device cpu --quiet"
)


def sums_corpus(path: Path, n: int = 300) -> Path:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(json.dumps({"text": f"{a}+{b}={a + b}; {b}+{a}={a + b}."}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An anchor, a corpus, and the expert one process trains on them (the reference)."""
    root = tmp_path_factory.mktemp("ddp")
    anchor = build_anchor("olmo2", root / "anchor")
    data = sums_corpus(root / "sums.jsonl")
    train_expert(anchor.path, [data], "acme", root / "single", CFG, progress=False)
    return {"root": root, "anchor": anchor, "data": data}


def torchrun_train(anchor: Anchor, data: Path, out: Path) -> subprocess.CompletedProcess[str]:
    where = ["--public", str(anchor.path), "--data", str(data), "--org", "acme", "--out", str(out)]
    cmd = [*TORCHRUN, FLEXFED, "client", "train", *where, *CLI_ARGS]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def assert_same_expert(single: Path, ddp: Path, anchor: Anchor) -> None:
    a = load_tensors(single / "expert.safetensors")
    b = load_tensors(ddp / "expert.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=ATOL, rtol=RTOL, msg=key)
    # The comparison means something only if training moved the expert far beyond the tolerance.
    public = Checkpoint.open(anchor.path).tensor("model.layers.0.mlp.gate_proj.weight")
    assert (a["layers.0.gate_proj.weight"] - public).abs().max() > 100 * ATOL
    validate_bundle(ddp, anchor)


def test_two_processes_train_the_single_process_expert(run: dict[str, Any]) -> None:
    """torchrun with 2 processes writes (rank 0 only) the expert one process trains."""
    out = run["root"] / "ddp"
    torchrun_train(run["anchor"], run["data"], out)
    assert_same_expert(run["root"] / "single", out, run["anchor"])
    meta = json.loads((out / "expert.json").read_text())
    assert meta["training"]["steps"] == CFG.max_steps
    single = json.loads((run["root"] / "single" / "expert.json").read_text())
    for key in ("final_loss", "val_loss_public", "val_loss_expert"):
        assert meta["training"][key] == pytest.approx(single["training"][key], abs=1e-5), key
    assert not state_dir_for(out).exists()


class Interrupted(Exception):
    pass


def test_torchrun_resumes_a_run_and_every_rank_loads_the_state(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped after its step-4 checkpoint, resumed by torchrun on 2 processes (the
    state does not depend on the number of processes), ends at the reference expert."""

    @contextmanager
    def stop_at_step_5(*args: Any, **kwargs: Any) -> Iterator[Any]:
        def report(step: int, loss: float) -> None:
            if step == 5:
                raise Interrupted

        yield report

    out = run["root"] / "resumed"
    monkeypatch.setattr(trainer, "training_progress", stop_at_step_5)
    with pytest.raises(Interrupted):
        train_expert(run["anchor"].path, [run["data"]], "acme", out, CFG, progress=False)
    monkeypatch.undo()
    assert json.loads((state_dir_for(out) / "latest" / "progress.json").read_text())["step"] == 4

    proc = torchrun_train(run["anchor"], run["data"], out)
    assert "resumed at step 4" in proc.stdout
    assert_same_expert(run["root"] / "single", out, run["anchor"])


def test_all_reduced_gradient_is_the_single_process_gradient(tmp_path: Path) -> None:
    """The loss scaling: after one step's micro-batches, each rank's gradient (DDP, 2 ranks x
    2 micro-batches of 2) is the gradient one process computes on the whole batch of 8 in one
    forward pass; frozen tensors get no gradient."""
    anchor = build_anchor("llama", tmp_path / "anchor")
    proc = subprocess.run(
        [*TORCHRUN, __file__, "grad", str(anchor.path), str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rank0, rank1 = (load_tensors(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    single = load_tensors(tmp_path / "single.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys()
    assert all(".mlp.expert." in k or k.endswith((".mlp.router", ".mlp.bias")) for k in single)
    for key in single:
        assert torch.equal(rank0[key], rank1[key]), key  # replicas stay identical
        assert single[key].abs().max() > 0, key
        # Gradients are ~1e-4..1e-3 and differ by <1e-9: a wrong loss scale (x2, x0.5) fails.
        torch.testing.assert_close(rank0[key], single[key], atol=1e-8, rtol=1e-4, msg=key)


def test_a_failing_rank_does_not_hang_the_others(tmp_path: Path) -> None:
    """Rank 1 fails while rank 0 waits for it: torchrun ends the launch with an error."""
    proc = subprocess.run(
        [*TORCHRUN, __file__, "fail"], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr


def test_batch_split_rule() -> None:
    """Each process takes batch/N sequences, in micro-batches of min(micro, batch/N)."""
    assert per_process_batch(TrainConfig(batch_size=8, micro_batch_size=8), 1) == (8, 8)
    assert per_process_batch(TrainConfig(batch_size=8, micro_batch_size=8), 2) == (4, 4)
    assert per_process_batch(TrainConfig(batch_size=16, micro_batch_size=2), 4) == (4, 2)
    with pytest.raises(ConfigError, match="multiple of 3"):
        per_process_batch(TrainConfig(batch_size=8, micro_batch_size=8), 3)
    with pytest.raises(ConfigError, match="divides 6"):
        per_process_batch(TrainConfig(batch_size=12, micro_batch_size=4), 2)


# --- worker (run by torchrun) ---------------------------------------------------------------


def _gradient_worker(anchor_dir: str, out_dir: str) -> None:
    from flexfed.client.parallel import data_parallel, wrap_for_training
    from flexfed.common.formats.anchor import open_anchor
    from flexfed.common.formats.safetensors_io import save_tensors
    from flexfed.common.moe.recipe import accumulate_gradients
    from flexfed.common.moe.router_init import random_router_init
    from flexfed.common.moe.training_model import build_training_model, z_loss_term

    cfg = TrainConfig(seq_len=16, batch_size=8, micro_batch_size=2, device="cpu")
    anchor = open_anchor(anchor_dir)
    init = random_router_init(anchor.shapes.hidden_size, anchor.shapes.num_layers, seed=1)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (cfg.batch_size, cfg.seq_len), generator=g)  # (B, T)

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    with data_parallel(cfg.device) as par:
        share, micro = per_process_batch(cfg, par.world_size)
        model = build_training_model(anchor, init, bias_init=-0.1).train()
        forward, ddp = wrap_for_training(model, cfg, par)
        mine = batch[par.rank * share : (par.rank + 1) * share]
        z_loss = z_loss_term(model, cfg.z_loss_weight)
        accumulate_gradients(forward, mine, micro, par.device, z_loss, ddp)
        save_tensors(Path(out_dir) / f"rank{par.rank}.safetensors", grads(model))
        if par.is_main:
            ref = build_training_model(anchor, init, bias_init=-0.1).train()
            ref_z_loss = z_loss_term(ref, cfg.z_loss_weight)
            accumulate_gradients(ref, batch, cfg.batch_size, par.device, ref_z_loss)
            save_tensors(Path(out_dir) / "single.safetensors", grads(ref))


def _failing_worker() -> None:
    from flexfed.client.parallel import data_parallel

    with data_parallel("cpu") as par:
        if par.rank == 1:
            raise ConfigError("rank 1 fails on purpose")
        par.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "grad":
        _gradient_worker(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "fail":
        _failing_worker()
