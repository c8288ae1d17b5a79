"""Differentially private experts (DP-SGD): the mechanism, the accountant, the record.

Protects: the noise is calibrated by Opacus's accountant to the requested epsilon; each
sequence's gradient is clipped before summing; the Poisson sample is a pure function of
(seed, step) at rate q; a DP run records in the signed expert.json the epsilon the accountant
computes for the steps taken, ``inspect`` shows it, a resumed DP run is bit-identical to an
uninterrupted one, and impossible settings are refused with a clear error.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from opacus.accountants import RDPAccountant

import flexfed.client.trainer as trainer
from flexfed.client.trainer import state_dir_for, train_expert
from flexfed.common.cli import cli
from flexfed.common.errors import ConfigError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.formats.safetensors_io import load_tensors
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.privacy import (
    DPPlan,
    plan_dp,
    poisson_sample,
    privacy_summary,
    private_gradients,
)

DP = TrainConfig(
    seq_len=32,
    batch_size=4,
    micro_batch_size=4,
    max_steps=6,
    lr=3e-3,
    checkpoint_every=3,
    eval_batches=2,
    dp_epsilon=8.0,
    dp_delta=1e-4,
    dp_max_grad_norm=0.5,
)


def sums(path: Path, n: int = 600) -> Path:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append(json.dumps({"text": f"{a}+{b}={a + b}; {b}+{a}={a + b}."}))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_noise_is_calibrated_by_the_accountant() -> None:
    plan = plan_dp(8.0, 1e-5, 1.0, batch_size=8, records=2000, steps=100)
    assert plan.sample_rate == 0.004
    assert plan.expected_batch_size == 8.0
    assert plan.noise_multiplier == pytest.approx(0.4355, abs=1e-3)
    # Opacus's own accountant, run here independently, agrees the run spends at most 8.
    accountant = RDPAccountant()
    accountant.history = [(plan.noise_multiplier, 0.004, 100)]
    assert 7.9 < accountant.get_epsilon(delta=1e-5) <= 8.0
    # A smaller budget needs more noise.
    assert plan_dp(1.0, 1e-5, 1.0, 8, 2000, 100).noise_multiplier == pytest.approx(0.947, abs=1e-3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((8.0, 1e-5, 1.0, 8, 10, 100), "at least twice the batch size"),
        ((8.0, 0.01, 1.0, 8, 2000, 100), "not below 1/N"),
        ((0.0, 1e-5, 1.0, 8, 2000, 100), "dp-epsilon must be positive"),
        ((8.0, 1e-5, -1.0, 8, 2000, 100), "dp-max-grad-norm must be positive"),
    ],
)
def test_impossible_settings_are_refused(args: tuple[float, ...], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_dp(*args)  # type: ignore[arg-type]


def test_poisson_sample_is_a_function_of_seed_and_step() -> None:
    plan = plan_dp(8.0, 1e-5, 1.0, batch_size=8, records=2000, steps=100)
    assert torch.equal(poisson_sample(plan, 5, seed=1), poisson_sample(plan, 5, seed=1))
    assert not torch.equal(poisson_sample(plan, 5, seed=1), poisson_sample(plan, 6, seed=1))
    sizes = [len(poisson_sample(plan, step, seed=0)) for step in range(400)]
    assert 7.0 < sum(sizes) / len(sizes) < 9.0  # q N = 8 on average
    assert len(set(sizes)) > 3  # batch sizes vary, as Poisson sampling does


def test_each_sequences_gradient_is_clipped() -> None:
    """With no noise, the summed gradient is at most (batch) x C: every row was clipped."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 16)
    params = list(layer.parameters())
    plan = DPPlan(8.0, 1e-5, 0.01, 0.0, 0.1, 10, 40, 4.0)
    batch = torch.randn(5, 16) * 100  # huge inputs: huge per-example gradients

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return layer(x).pow(2).sum()

    private_gradients(plan, params, loss_of, batch, step=0, seed=0, device=torch.device("cpu"))
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))  # type: ignore[operator,misc]
    assert 0.0 < float(norm) * 4.0 <= 5 * 0.01 + 1e-6


def test_noise_is_added_with_the_planned_scale() -> None:
    layer = torch.nn.Linear(64, 64, bias=False)
    plan = DPPlan(8.0, 1e-5, 2.0, 0.5, 0.1, 10, 40, 4.0)
    private_gradients(
        plan, [layer.weight], lambda x: x.sum(), torch.empty(0, 64), 0, 0, torch.device("cpu")
    )
    assert layer.weight.grad is not None
    # An empty sample: pure noise, std sigma C / (q N) = 0.5 * 2 / 4 = 0.25.
    assert float(layer.weight.grad.std()) == pytest.approx(0.25, rel=0.05)


def test_a_dp_run_records_the_accountants_epsilon(small_anchor: Anchor, tmp_path: Path) -> None:
    data = sums(tmp_path / "sums.jsonl")
    train_expert(small_anchor.path, [data], "acme", tmp_path / "dp", DP, progress=False)
    meta = json.loads((tmp_path / "dp" / "expert.json").read_text())
    dp = meta["training"]["differential_privacy"]
    assert dp["target_epsilon"] == 8.0 and dp["delta"] == 1e-4 and dp["max_grad_norm"] == 0.5
    assert dp["steps"] == 6 and dp["steps_done"] == 6 and dp["accountant"] == "rdp"
    accountant = RDPAccountant()
    accountant.history = [(dp["noise_multiplier"], dp["sample_rate"], 6)]
    assert dp["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-4), abs=1e-5)
    assert dp["epsilon"] <= 8.0
    assert dp["sample_rate"] == pytest.approx(4 / dp["records"])

    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "dp")])
    assert shown.exit_code == 0, shown.output
    assert f"epsilon={dp['epsilon']}" in shown.output
    assert privacy_summary(meta["training"]) == {
        k: dp[k] for k in ("epsilon", "delta", "max_grad_norm", "noise_multiplier", "sample_rate")
    } | {"steps_done": 6}

    train_expert(
        small_anchor.path,
        [data],
        "acme",
        tmp_path / "plain",
        TrainConfig(seq_len=32, batch_size=4, micro_batch_size=4, max_steps=2, eval_batches=2),
        progress=False,
    )
    plain = json.loads((tmp_path / "plain" / "expert.json").read_text())
    assert "differential_privacy" not in plain["training"]
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "plain")])
    assert "none (trained without DP)" in shown.output


def test_a_resumed_dp_run_is_bit_identical(
    small_anchor: Anchor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = sums(tmp_path / "sums.jsonl")
    train_expert(small_anchor.path, [data], "acme", tmp_path / "straight", DP, progress=False)

    finish = trainer._finish

    def crash(*_: object) -> None:
        raise KeyboardInterrupt("killed after the loop")

    monkeypatch.setattr(trainer, "_finish", crash)
    with pytest.raises(KeyboardInterrupt):
        train_expert(small_anchor.path, [data], "acme", tmp_path / "resumed", DP, progress=False)
    assert state_dir_for(tmp_path / "resumed").exists()  # step 3's checkpoint
    monkeypatch.setattr(trainer, "_finish", finish)
    result = train_expert(
        small_anchor.path, [data], "acme", tmp_path / "resumed", DP, progress=False
    )
    assert result.resumed_from == 3
    a = load_tensors(tmp_path / "straight" / "expert.safetensors")
    b = load_tensors(tmp_path / "resumed" / "expert.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    same = ("epsilon", "noise_multiplier", "steps_done")
    dp_a = json.loads((tmp_path / "straight" / "expert.json").read_text())["training"]
    dp_b = json.loads((tmp_path / "resumed" / "expert.json").read_text())["training"]
    for k in same:
        assert dp_a["differential_privacy"][k] == dp_b["differential_privacy"][k]


def test_a_negative_epsilon_is_refused() -> None:
    with pytest.raises(ConfigError, match="dp-epsilon must be positive"):
        TrainConfig(dp_epsilon=-1.0)
