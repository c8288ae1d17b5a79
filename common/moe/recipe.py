"""The training recipe: one config, one schedule, one step, for the expert and the dense baselines.

The paper's recipe (DESIGN.md, "Expert training"): AdamW with betas (0.9, 0.95) and weight
decay 0, a cosine schedule with linear warmup decaying to 0.1 x peak, gradient clipping at 1.0,
next-token cross-entropy plus 0.001 x router z-loss (expert training only), no load-balancing
loss. The owner's trainer (:mod:`flexfed.client.trainer`) runs it on the 2-expert model; the
demo and the benchmarks run :func:`train_dense` (the public model's own pre-training at small
scale, and the dense baselines) with the same step.

The settings are :class:`flexfed.common.moe.config.TrainConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from flexfed.common.errors import DeviceError
from flexfed.common.moe.config import TrainConfig
from flexfed.common.util.progress import training_progress


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA if available, else the CPU; a CUDA request without CUDA is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(
            "--device cuda was requested but no CUDA device is available; use --device cpu"
        )
    return torch.device(requested)


def autocast(device: torch.device) -> Any:
    """bf16 autocast on CUDA; full precision (autocast disabled) on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Sequence indices of a step: epochs are seeded permutations, a function of the step."""
    out = []
    for j in range(batch_size):
        k = step * batch_size + j
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return torch.tensor(out)


def accumulate_gradients(
    forward: nn.Module,
    batch: torch.Tensor,
    micro: int,
    device: torch.device,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    ddp: DistributedDataParallel | None = None,
) -> float:
    """Forward and backward ``batch`` (this process's share of a step) in micro-batches.

    Leaves in ``.grad`` the gradient of the mean loss over the step's *global* batch and
    returns this process's mean next-token loss. ``forward`` is the model itself, or ``ddp``
    (``DistributedDataParallel`` over it), possibly compiled. ``extra_loss`` is added to each
    micro-batch's loss after its forward (the router z-loss of expert training).
    """
    # NOTE: each process divides its micro-batch losses by its own number of micro-batches and
    # DDP averages gradients over the N processes, so the result is 1 / (all micro-batches of
    # the step) times the sum of the gradients of every micro-batch mean loss: the gradient of
    # the mean over the global batch, as in one process. (Every sequence holds seq_len
    # labelled tokens, so equal-sized micro-batch means average to the batch mean.)
    accum = len(batch) // micro
    step_loss = 0.0
    for m in range(accum):
        # Gradients are all-reduced once per step, in the last micro-batch's backward.
        last = m == accum - 1
        with ddp.no_sync() if ddp is not None and not last else nullcontext():
            ids = batch[m * micro : (m + 1) * micro].to(device)  # (micro, T)
            with autocast(device):
                out = forward(input_ids=ids, labels=ids)
                loss = out.loss if extra_loss is None else out.loss + extra_loss()
            (loss / accum).backward()
        step_loss += float(out.loss.detach()) / accum
    return step_loss


def optimizer_step(
    opt: torch.optim.Optimizer, params: list[nn.Parameter], grad_clip: float
) -> None:
    """Clip the gradient norm, take one optimizer step, clear the gradients."""
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def set_lr(opt: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """Put this step's scheduled learning rate into every parameter group."""
    for group in opt.param_groups:
        group["lr"] = cfg.lr_at(step)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: torch.Tensor, micro_batch: int, device: torch.device, max_batches: int
) -> float:
    """Mean next-token loss over (at most ``max_batches``) validation micro-batches."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, min(len(data), micro_batch * max_batches), micro_batch):
        ids = data[i : i + micro_batch].to(device)
        with autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * len(ids)
        count += len(ids)
    model.train(was)
    return total / max(1, count)


def train_dense(
    model: PreTrainedModel,
    train: torch.Tensor,
    cfg: TrainConfig,
    progress: bool = False,
    only: str | None = None,
) -> list[float]:
    """A plain dense fine-tune with the same recipe: the baseline and the public model's own
    pre-training on small data. Every parameter trains, or only those whose name contains
    ``only`` (e.g. ``".mlp."``: the uncoordinated-expert ablation). Returns per-step losses."""
    device = resolve_device(cfg.device)
    model.to(device).train()  # type: ignore[arg-type]  # transformers' @wraps'd .to
    for name, p in model.named_parameters():
        p.requires_grad_(only is None or only in name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    with training_progress(cfg.max_steps, 0, tokens_per_step, enabled=progress) as report:
        for step in range(cfg.max_steps):
            set_lr(opt, cfg, step)
            batch = train[batch_indices(step, cfg.batch_size, len(train), cfg.seed)]  # (B, T)
            step_loss = accumulate_gradients(model, batch, cfg.micro_batch_size, device)
            optimizer_step(opt, params, cfg.grad_clip)
            losses.append(step_loss)
            report(step + 1, step_loss)
    model.eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.eval is unannotated
    return losses
