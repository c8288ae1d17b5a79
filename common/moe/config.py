"""The settings of one training run: :class:`TrainConfig` (no torch import, so the CLI is fast).

Every field carries its help text next to its default; the CLI builds its options from them
(:func:`flexfed.common.cli.options.config_options`), so each default lives here once. The
recipe that uses them is :mod:`flexfed.common.moe.recipe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flexfed.common.errors import ConfigError

DEFAULT_ROUTER_DOCUMENTS = 1000  # documents sampled for a router embedding (r_i, r_pub)
DEFAULT_ROUTER_MAX_TOKENS = 512  # tokens of each sampled document used
DEFAULT_ROUTER_SEED = 2025  # the document sample's seed when none is given
ROUTER_INITS = ("hidden-states", "embedder", "random", "public")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run (defaults: the paper's recipe, scaled to CPU)."""

    seq_len: int = field(default=256, metadata=_help("Tokens per training sequence."))
    batch_size: int = field(default=8, metadata=_help("Sequences per optimizer step."))
    micro_batch_size: int = field(
        default=8,
        metadata=_help(
            "Sequences per forward pass (gradient accumulation; default: the batch size).",
            default_from="batch_size",
        ),
    )
    max_steps: int = field(default=200, metadata=_help("Optimizer steps."))
    lr: float = field(default=9e-4, metadata=_help("Peak learning rate."))
    warmup_steps: int | None = field(
        default=None, metadata=_help("Warmup steps (default: 10% of max steps).")
    )
    min_lr_ratio: float = field(
        default=0.1, metadata=_help("The cosine schedule ends at this fraction of the peak.")
    )
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    z_loss_weight: float = 1e-3
    bias_init: float = field(
        default=0.0, metadata=_help("Initial router bias b_i (clamped to <= 0).")
    )
    learn_bias: bool = field(
        default=True,
        metadata=_help("Train the negative router bias b_i (off: the no-bias ablation)."),
    )
    router_init: str = field(
        default="hidden-states",
        metadata=_help(
            "How r_i starts: hidden-states (mean public-model MLP input of your documents), "
            "embedder (the anchor's external embedder, projected), random, or public (r_pub).",
            choices=ROUTER_INITS,
        ),
    )
    router_init_documents: int = field(
        default=DEFAULT_ROUTER_DOCUMENTS,
        metadata=_help("Documents sampled to compute r_i (fewer: faster on a large model)."),
    )
    val_fraction: float = field(
        default=0.05, metadata=_help("Share of documents held out for validation.")
    )
    max_tokens: int | None = field(
        default=None, metadata=_help("Use at most this many tokens of data.")
    )
    eval_batches: int = field(
        default=16, metadata=_help("Held-out batches scored before and after training.")
    )
    checkpoint_every: int = field(
        default=50, metadata=_help("Steps between resumable checkpoints.")
    )
    seed: int = field(default=0, metadata=_help("Seed of the data order and the router init."))
    device: str = field(
        default="auto",
        metadata=_help(
            "auto (CUDA if available, else CPU), cpu, cuda or cuda:N; under torchrun each "
            "process uses cuda:LOCAL_RANK."
        ),
    )
    activation_checkpointing: bool = field(
        default=False, metadata=_help("Trade compute for memory.")
    )
    compile: bool = field(default=False, metadata=_help("torch.compile the model (CUDA only)."))
    dp_epsilon: float | None = field(
        default=None,
        metadata=_help(
            "Train with differential privacy (DP-SGD) spending at most this epsilon over the "
            "whole run, per training sequence (default: no DP)."
        ),
    )
    dp_delta: float = field(
        default=1e-5,
        metadata=_help("DP delta; must be below 1 / the number of training sequences."),
    )
    dp_max_grad_norm: float = field(
        default=1.0, metadata=_help("DP-SGD: each sequence's gradient is clipped to this norm.")
    )

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "micro_batch_size", "max_steps", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError("batch-size must be a multiple of micro-batch-size")
        if not self.lr > 0:
            raise ConfigError("lr must be positive")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError("warmup-steps must be between 0 and max-steps")
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"router-init must be one of {', '.join(ROUTER_INITS)}")
        if not 0.0 <= self.val_fraction < 0.5:
            raise ConfigError("val-fraction must be in [0, 0.5)")
        if self.dp_epsilon is not None and not self.dp_epsilon > 0:
            raise ConfigError("dp-epsilon must be positive")
        if not 0 < self.dp_delta < 1:
            raise ConfigError("dp-delta must be in (0, 1)")
        if not self.dp_max_grad_norm > 0:
            raise ConfigError("dp-max-grad-norm must be positive")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.max_steps // 10

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at max_steps."""
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        span = max(1, self.max_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        floor = self.min_lr_ratio * self.lr
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))
