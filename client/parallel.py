"""Data-parallel expert training under ``torchrun`` (DDP): process groups, batch split, agreement.

Launched by ``torchrun`` with more than one process, every process (rank) holds a replica of the
2-expert model wrapped in ``DistributedDataParallel`` and takes its share of each step's global
batch (:func:`per_process_batch`); the all-reduced gradient is the single-process gradient of
the same global batch. Rank 0 alone evaluates and writes (checkpoints, the bundle, progress).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedModel

from flexfed.common.errors import ConfigError, DeviceError
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.recipe import resolve_device

# NOTE: every collective waits at most this long, so a rank that dies or hangs without torchrun
# noticing (torchrun itself stops all ranks as soon as one exits with an error) cannot block
# the others forever. Rank 0's checkpoint and bundle writes happen while the others wait.
DIST_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class DataParallel:
    """Where this process sits in a ``torchrun`` launch; rank 0 of 1 when not launched by it."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ConfigError(f"{name} is not set; launch data-parallel training with torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None


def _rank_device(requested: str, local_rank: int) -> torch.device:
    """The device of one torchrun process: ``cuda:LOCAL_RANK`` on CUDA, else the CPU."""
    if requested.startswith("cuda:"):
        raise ConfigError(
            f"--device {requested} cannot be used under torchrun: each process uses "
            "cuda:LOCAL_RANK; pass --device cuda (choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    device = resolve_device(requested)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(
            f"torchrun started process {local_rank} on this node, which sees only {count} "
            f"GPU(s); use --nproc_per_node {count} or fewer"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def data_parallel(requested_device: str) -> Iterator[DataParallel]:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1; leave it after.

    NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU. A process group that
    the caller already initialised is used as it is and left alone.
    """
    if _env_int("WORLD_SIZE", 1) <= 1 and not (dist.is_available() and dist.is_initialized()):
        yield DataParallel(resolve_device(requested_device))
        return
    device = _rank_device(requested_device, _env_int("LOCAL_RANK", 0))
    owned = not dist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", timeout=DIST_TIMEOUT, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
    try:
        yield DataParallel(device, dist.get_rank(), dist.get_world_size())
    finally:
        if owned:
            dist.destroy_process_group()


def per_process_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(sequences per process per step, sequences per forward pass) for ``world_size`` ranks.

    Each rank takes ``batch_size / world_size`` consecutive sequences of the step's global
    batch, so the ranks' shares together are exactly the single-process batch, and runs them
    in micro-batches of ``min(micro_batch_size, share)`` (the CLI's default micro-batch is the
    whole batch, which must still work on N GPUs), which must divide the share.
    """
    if cfg.batch_size % world_size:
        raise ConfigError(
            f"batch-size {cfg.batch_size} cannot be split evenly over {world_size} processes; "
            f"use a batch-size that is a multiple of {world_size}"
        )
    share = cfg.batch_size // world_size
    micro = min(cfg.micro_batch_size, share)
    if share % micro:
        raise ConfigError(
            f"each of the {world_size} processes gets {share} sequences of every batch, which "
            f"micro-batches of {micro} do not divide; use a micro-batch-size that divides "
            f"{share}, or a batch-size that is a multiple of {world_size * micro}"
        )
    return share, micro


def agree(par: DataParallel, value: Any, what: str) -> None:
    """Raise :class:`ConfigError` on every rank unless all ranks hold the same ``value``."""
    if not par.enabled:
        return
    digest = hashlib.sha256(json.dumps(value, sort_keys=True).encode()).digest()
    mine = torch.tensor(list(digest[:16]), dtype=torch.int64, device=par.device)  # (16,)
    everyone = [torch.empty_like(mine) for _ in range(par.world_size)]
    dist.all_gather(everyone, mine)
    odd = [rank for rank, theirs in enumerate(everyone) if not torch.equal(theirs, everyone[0])]
    if odd:
        raise ConfigError(
            f"the torchrun processes disagree on {what} (rank {odd[0]} differs from rank 0); "
            "every process must see the same --public, --data and --out paths, on a shared "
            "filesystem when training on several nodes"
        )


def mean_over_ranks(par: DataParallel, values: list[float]) -> list[float]:
    if not par.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=par.device)
    dist.all_reduce(t)
    return [v / par.world_size for v in t.tolist()]


def from_main(par: DataParallel, values: list[float]) -> list[float]:
    """Rank 0's ``values`` on every rank; also a barrier: the others wait for rank 0 here."""
    if not par.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=par.device)
    dist.broadcast(t, src=0)
    return [float(v) for v in t.tolist()]


def wrap_for_training(
    model: PreTrainedModel, cfg: TrainConfig, par: DataParallel
) -> tuple[nn.Module, DistributedDataParallel | None]:
    """(the module the loop calls, the DDP wrapper or None) for ``model`` on this process.

    DDP over ``model`` when data-parallel, ``torch.compile`` on top when asked for on CUDA.
    """
    ddp = None
    wrapped: nn.Module = model
    if par.enabled:
        # NOTE: DDP hooks only parameters with requires_grad, so the frozen public tensors are
        # never all-reduced. Every trainable tensor (new FFN, r_i, b_i of every layer) takes
        # part in every forward, so find_unused_parameters (an extra graph walk) is not needed.
        # Construction broadcasts rank 0's parameters: all ranks start from rank 0's router init.
        ddp = DistributedDataParallel(
            model, device_ids=[par.device.index] if par.device.type == "cuda" else None
        )
        wrapped = ddp
    if cfg.compile and par.device.type == "cuda":
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    return wrapped, ddp
