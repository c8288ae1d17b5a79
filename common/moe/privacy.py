"""Differentially private expert training (DP-SGD), with Opacus's privacy accountant.

FlexOlmo trains each expert alone on one owner's data, so differential privacy applies to each
expert independently (paper, Section 6). What is private: the owner's trainable tensors (the
expert FFN, r_i, b_i); everything else is the frozen public model, which saw no private data.

The mechanism is DP-SGD (Abadi et al., 2016) exactly as the accountant assumes it:

- **Poisson sampling**: at each step every training sequence is in the batch independently
  with probability ``q = batch_size / N`` (so batches vary in size, ``batch_size`` on average);
- **per-example clipping**: each sequence's gradient over the trainable tensors is clipped to
  L2 norm ``C`` (``--dp-max-grad-norm``);
- **Gaussian noise**: N(0, (sigma C)^2) is added to the sum, which is divided by the expected
  batch size ``q N``;
- the **accountant** (Opacus's RDP accountant) turns (sigma, q, steps) into (epsilon, delta);
  sigma is the smallest that keeps the whole run within the requested ``--dp-epsilon`` at
  ``--dp-delta`` (Opacus's ``get_noise_multiplier``).

A "record" is one training sequence (``seq_len`` tokens of packed documents): the guarantee is
per sequence. A document longer than one sequence, or repeated in the data, is protected only
at a correspondingly weaker level (group privacy); say so when quoting epsilon.

The per-example gradient is computed with one backward pass per sampled sequence: simple and
exact for any model, and slow in proportion to the batch size (an Opacus ``GradSampleModule``
cannot see through the 2-expert layer's fused router). The noise and the sample are drawn from
generators seeded by (seed, step), so a resumed run repeats the same mechanism step for step
and the accountant's state is the number of steps taken.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from flexfed.common.errors import ConfigError

ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD mechanism of one training run."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    records: int  # training sequences N
    expected_batch_size: float
    accountant: str = ACCOUNTANT

    def record(self, steps_done: int) -> dict[str, Any]:
        """What goes into the expert's provenance: the mechanism and the epsilon spent."""
        return {
            **asdict(self),
            "epsilon": round(spent_epsilon(self, steps_done), 6),
            "steps_done": steps_done,
            "mechanism": "DP-SGD: Poisson sampling, per-sequence clipping, Gaussian noise",
            "unit": "one training sequence",
        }


def plan_dp(
    epsilon: float, delta: float, max_grad_norm: float, batch_size: int, records: int, steps: int
) -> DPPlan:
    """The noise that spends at most ``epsilon`` over ``steps`` Poisson-sampled steps."""
    from opacus.accountants.utils import get_noise_multiplier

    if not epsilon > 0:
        raise ConfigError(f"dp-epsilon must be positive, got {epsilon}")
    if not 0 < delta < 1:
        raise ConfigError(f"dp-delta must be in (0, 1), got {delta}")
    if not max_grad_norm > 0:
        raise ConfigError(f"dp-max-grad-norm must be positive, got {max_grad_norm}")
    if records < 2 * batch_size:
        raise ConfigError(
            f"differential privacy needs at least twice the batch size in training sequences "
            f"({2 * batch_size}); the data has {records}"
        )
    if delta >= 1 / records:
        raise ConfigError(
            f"dp-delta {delta} is not below 1/N = {1 / records:.3g} for N = {records} training "
            "sequences: a delta that large allows publishing a record outright"
        )
    q = batch_size / records
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        sigma = float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=ACCOUNTANT,
            )
        )
    return DPPlan(
        target_epsilon=epsilon,
        delta=delta,
        max_grad_norm=max_grad_norm,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=steps,
        records=records,
        expected_batch_size=q * records,
    )


def spent_epsilon(plan: DPPlan, steps_done: int) -> float:
    """Epsilon spent after ``steps_done`` steps, by the accountant."""
    from opacus.accountants import RDPAccountant

    if steps_done == 0:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = [(plan.noise_multiplier, plan.sample_rate, steps_done)]
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is valid, only not the tightest.
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(accountant.get_epsilon(delta=plan.delta))


def _generator(seed: int, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4 + stream)


def poisson_sample(plan: DPPlan, step: int, seed: int) -> torch.Tensor:
    """The step's batch: each of the N sequences independently with probability q."""
    draw = torch.rand(plan.records, generator=_generator(seed, step, 0))
    return torch.nonzero(draw < plan.sample_rate).flatten()


def private_gradients(
    plan: DPPlan,
    params: Sequence[nn.Parameter],
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    batch: torch.Tensor,
    step: int,
    seed: int,
    device: torch.device,
) -> float:
    """Put the step's DP-SGD gradient into ``.grad`` of ``params``; returns the mean loss.

    ``loss_of(ids)`` is one sequence's loss (shape (1, T) in). ``batch`` holds the step's
    Poisson-sampled sequences (it may be empty: then the gradient is noise only).
    """
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    losses = 0.0
    for row in batch:
        for p in params:
            p.grad = None
        loss = loss_of(row.unsqueeze(0).to(device))
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [
            p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            for p in params
        ]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))  # type: ignore[arg-type]
        scale = min(1.0, plan.max_grad_norm / (float(norm) + 1e-12))
        for acc, g in zip(total, grads, strict=True):
            acc.add_(g, alpha=scale)
        losses += float(loss.detach())
    noise = _generator(seed, step, 1)
    std = plan.noise_multiplier * plan.max_grad_norm
    for p, acc in zip(params, total, strict=True):
        acc.add_(torch.randn(acc.shape, generator=noise).to(acc.device) * std)
        p.grad = (acc / plan.expected_batch_size).to(p.dtype)
    return losses / max(1, len(batch))


def privacy_summary(training: Any) -> dict[str, Any] | None:
    """The DP guarantee an expert.json's ``training`` records, or None if it records none.

    What an owner's trainer recorded and the owner signed: a claim bound to the owner, not a
    proof (nobody but the owner saw the training). Malformed values are reported as such.
    """
    dp = training.get("differential_privacy") if isinstance(training, dict) else None
    if dp is None:
        return None
    keys = ("epsilon", "delta", "max_grad_norm", "noise_multiplier", "sample_rate", "steps_done")
    if not isinstance(dp, dict) or not all(
        isinstance(dp.get(k), (int, float)) and not isinstance(dp.get(k), bool) for k in keys
    ):
        return {"epsilon": "malformed", "delta": "malformed"}
    return {k: dp[k] for k in keys}
