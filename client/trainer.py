"""The local expert trainer: what ``flexfed client train`` runs behind the owner's firewall.

The recipe is the paper's (DESIGN.md, "Expert training"): the 2-expert model of
:mod:`flexfed.common.training_model`, AdamW with betas (0.9, 0.95) and weight decay 0, a
cosine schedule with linear warmup decaying to 0.1 x peak, gradient clipping at 1.0, and
next-token cross-entropy plus 0.001 x router z-loss. No load-balancing loss.

Runs are resumable: every ``checkpoint_every`` steps the trainable tensors and the optimizer
moments are written (safetensors, never pickle) to ``<out>.train-state/``. Rerunning the same
command resumes from there, and on CPU with a fixed seed the result is bit-identical to an
uninterrupted run: the data order is a pure function of (seed, step) and the learning rate a
pure function of the step, so no RNG state needs saving.

Launched by ``torchrun`` with more than one process, training is data-parallel
(:func:`data_parallel`): every process (rank) holds a replica of the 2-expert model wrapped in
``DistributedDataParallel`` and takes its share of each step's global batch
(:func:`per_process_batch`); the all-reduced gradient is the single-process gradient of the
same global batch. Rank 0 alone evaluates and writes (checkpoints, the bundle, progress).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flexfed.client.parallel import (
    DataParallel,
    agree,
    data_parallel,
    from_main,
    mean_over_ranks,
    per_process_batch,
    resolve_device,
    wrap_for_training,
)
from flexfed.common import __version__
from flexfed.common.anchor import Anchor, open_anchor
from flexfed.common.bundle import ORG_PATTERN, ExpertMeta, write_bundle
from flexfed.common.checkpoint import write_json
from flexfed.common.data import (
    PackedData,
    data_commitment,
    find_data_files,
    pack_documents,
    read_documents,
)
from flexfed.common.errors import (
    ConfigError,
    OutputExistsError,
)
from flexfed.common.evaluation import load_tokenizer as load_model_tokenizer
from flexfed.common.progress import console, training_progress
from flexfed.common.router_init import (
    DEFAULT_DOCUMENTS,
    mlp_input_means,
    random_router_init,
    sample_documents,
)
from flexfed.common.safetensors_io import load_tensors, save_tensors
from flexfed.common.training_model import (
    build_training_model,
    extract_expert,
    router_z_loss,
    trainable_parameters,
    two_expert_layers,
)

log = logging.getLogger(__name__)

ROUTER_INITS = ("hidden-states", "embedder", "random", "public")


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one expert-training run (defaults: the paper's, scaled to CPU)."""

    seq_len: int = 256
    batch_size: int = 8  # sequences per optimizer step
    micro_batch_size: int = 8  # sequences per forward pass (gradient accumulation)
    max_steps: int = 200
    lr: float = 9e-4
    warmup_steps: int | None = None  # default: 10% of max_steps
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    z_loss_weight: float = 1e-3
    bias_init: float = 0.0
    learn_bias: bool = True  # False: the 'no negative bias' ablation (b_i fixed at 0)
    router_init: str = "hidden-states"
    router_init_documents: int = DEFAULT_DOCUMENTS
    val_fraction: float = 0.05
    max_tokens: int | None = None
    eval_batches: int = 16
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False

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


@dataclass
class TrainResult:
    out: Path
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    val_loss_public: float
    val_loss_expert: float
    resumed_from: int = 0
    history: list[float] = field(default_factory=list)
    model: PreTrainedModel | None = field(default=None, repr=False)  # the trained 2-expert model
    rank: int = 0  # this process's rank under torchrun; only rank 0 wrote ``out``
    world_size: int = 1  # processes that trained together


def load_tokenizer(anchor: Anchor) -> PreTrainedTokenizerBase:
    """The anchor's tokenizer (see :func:`flexfed.common.evaluation.load_tokenizer`)."""
    return load_model_tokenizer(anchor.path)


def state_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.train-state"


def _check_writable(out: Path) -> None:
    if out.exists():
        raise OutputExistsError(f"{out} already exists; choose another --out or remove it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = parent / f".{out.name}.probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write the output next to {out}: {err.strerror or err}") from err


# --- resumable state -------------------------------------------------------------------------


def _save_state(
    state_dir: Path,
    model: PreTrainedModel,
    opt: torch.optim.Optimizer,
    step: int,
    info: dict[str, Any],
) -> None:
    """Write trainable tensors, optimizer moments and progress; atomically, newest wins."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    params = {names[id(p)]: p.detach().cpu() for group in opt.param_groups for p in group["params"]}
    moments: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    t = st[key]
                    moments[f"{names[id(p)]}::{key}"] = t.detach().cpu().float().reshape(t.shape)
    tmp = state_dir / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_tensors(tmp / "trainable.safetensors", params)
    save_tensors(tmp / "optimizer.safetensors", moments)
    write_json(tmp / "progress.json", {**info, "step": step})
    final = state_dir / "latest"
    old = state_dir / "previous"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(
    state_dir: Path, model: PreTrainedModel, opt: torch.optim.Optimizer
) -> dict[str, Any] | None:
    latest = state_dir / "latest"
    if not (latest / "progress.json").is_file():
        return None
    params = load_tensors(latest / "trainable.safetensors")
    moments = load_tensors(latest / "optimizer.safetensors")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(value)
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in named.items() if q is p)
            if f"{name}::step" in moments:
                opt.state[p] = {
                    "step": moments[f"{name}::step"].clone(),
                    "exp_avg": moments[f"{name}::exp_avg"].to(p.device, p.dtype).clone(),
                    "exp_avg_sq": moments[f"{name}::exp_avg_sq"].to(p.device, p.dtype).clone(),
                }
    progress: dict[str, Any] = json.loads((latest / "progress.json").read_text())
    return progress


# --- the loop -----------------------------------------------------------------------------


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
    model: PreTrainedModel,
    batch: torch.Tensor,
    micro: int,
    z_loss_weight: float,
    device: torch.device,
    ddp: DistributedDataParallel | None = None,
) -> float:
    """Forward and backward ``batch`` (this process's share of a step) in micro-batches.

    Leaves in ``.grad`` the gradient of the mean loss over the step's *global* batch and
    returns this process's mean next-token loss. ``forward`` is ``model`` itself, or ``ddp``
    (``DistributedDataParallel`` over ``model``), possibly compiled.
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
            with _autocast(device):
                out = forward(input_ids=ids, labels=ids)
                loss = out.loss + z_loss_weight * router_z_loss(model)
            (loss / accum).backward()
        step_loss += float(out.loss.detach()) / accum
    return step_loss


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
        with _autocast(device):
            loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * len(ids)
        count += len(ids)
    model.train(was)
    return total / max(1, count)


def _autocast(device: torch.device) -> Any:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _fingerprint(cfg: TrainConfig, anchor: Anchor, commitment: str, org: str) -> dict[str, Any]:
    keep = {k: v for k, v in asdict(cfg).items() if k not in {"checkpoint_every", "device"}}
    return {
        "config": keep,
        "anchor_digest": anchor.digest,
        "data_commitment": commitment,
        "org": org,
    }


def train_expert(
    public: Path | str,
    data: Sequence[Path | str],
    org: str,
    out: Path | str,
    cfg: TrainConfig = TrainConfig(),
    name: str = "expert",
    license: str = "proprietary; no use without the owner's consent",
    progress: bool = True,
) -> TrainResult:
    """Train one expert on local data and write its bundle to ``out``.

    Under ``torchrun`` with several processes every process calls this with the same
    arguments: they train one model data-parallel, and only rank 0 writes ``out``.
    """
    out = Path(out)
    if not ORG_PATTERN.fullmatch(org):
        raise ConfigError(f"--org {org!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if not ORG_PATTERN.fullmatch(name):
        raise ConfigError(f"--name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    with data_parallel(cfg.device) as par:
        return _train_expert(
            public, data, org, out, cfg, name, license, progress and par.is_main, par
        )


def _open_state_dir(state_dir: Path, fingerprint: dict[str, Any], par: DataParallel) -> None:
    """Check that ``state_dir`` holds this run's state, or (rank 0) claim it for this run."""
    run_file = state_dir / "run.json"
    recorded = json.loads(run_file.read_text()) if run_file.is_file() else None
    if recorded is not None and recorded != json.loads(json.dumps(fingerprint)):
        raise ConfigError(
            f"{state_dir} holds the state of a different run (other data, anchor or settings); "
            "remove it to start afresh, or rerun the original command to resume"
        )
    # NOTE: a collective, so every rank has read run.json before rank 0 may write it.
    agree(par, fingerprint, "the anchor, the data or the settings")
    if recorded is None and par.is_main:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_file, fingerprint)


def _train_expert(
    public: Path | str,
    data: Sequence[Path | str],
    org: str,
    out: Path,
    cfg: TrainConfig,
    name: str,
    license: str,
    progress: bool,
    par: DataParallel,
) -> TrainResult:
    device = par.device
    share, micro = per_process_batch(cfg, par.world_size)
    anchor = open_anchor(public)
    _check_writable(out)
    tokenizer = load_tokenizer(anchor)
    torch.manual_seed(cfg.seed)

    files = find_data_files(data)
    commitment, _manifest = data_commitment(files)
    docs = list(read_documents(files))
    packed: PackedData = pack_documents(
        docs, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.max_tokens
    )
    log.info("data: %d documents, %d train sequences", packed.num_documents, len(packed.train))

    state_dir = state_dir_for(out)
    _open_state_dir(state_dir, _fingerprint(cfg, anchor, commitment, org), par)

    # NOTE: every rank computes the router init (a deterministic function of the data and the
    # seed, as cheap in parallel as on one rank); DDP then makes rank 0's copy everyone's.
    router_init = _router_init(cfg, anchor, tokenizer, docs, device)
    model = build_training_model(anchor, router_init, cfg.bias_init, device=device)
    if not cfg.learn_bias:
        for mlp in two_expert_layers(model):
            mlp.bias.requires_grad_(False)
            mlp.bias.zero_()
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    model.train()
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",
    )

    # Every rank loads the same state (rank 0 writes it only between steps, below).
    resumed = _load_state(state_dir, model, opt)
    start = int(resumed["step"]) if resumed else 0
    agree(par, start, "the step to resume from")
    if resumed:
        val_public = float(resumed["val_loss_public"])
    elif par.is_main:
        val_public = evaluate(model, packed.val, cfg.micro_batch_size, device, cfg.eval_batches)
    else:
        val_public = float("nan")  # rank 0's value arrives at the end
    forward, ddp = wrap_for_training(model, cfg, par)
    history: list[float] = list(resumed.get("history", [])) if resumed else []
    tokens_per_step = cfg.batch_size * cfg.seq_len
    if progress:
        where = f"resuming at step {start}" if start else "starting"
        ranks = f" on {par.world_size} processes" if par.enabled else ""
        console.print(f"{org}/{name}: {where}{ranks}; resumable state in {state_dir}")
    first = par.rank * share  # this rank's share: sequences [first, first + share) of the batch
    t0 = time.monotonic()

    with training_progress(cfg.max_steps, start, tokens_per_step, enabled=progress) as report:
        for step in range(start, cfg.max_steps):
            lr = cfg.lr_at(step)
            for group in opt.param_groups:
                group["lr"] = lr
            idx = batch_indices(step, cfg.batch_size, len(packed.train), cfg.seed)
            batch = packed.train[idx[first : first + share]]  # (share, T): this rank's share
            step_loss = accumulate_gradients(
                forward, model, batch, micro, cfg.z_loss_weight, device, ddp
            )
            [step_loss] = mean_over_ranks(par, [step_loss])
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append(step_loss)
            report(step + 1, step_loss)
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                if par.is_main:
                    info = {"val_loss_public": val_public, "history": history}
                    _save_state(state_dir, model, opt, done, info)
                par.barrier()

    seconds = time.monotonic() - t0
    steps_run = cfg.max_steps
    final_loss = history[-1] if history else float("nan")
    val_expert = float("nan")
    if par.is_main:
        val_expert = evaluate(model, packed.val, cfg.micro_batch_size, device, cfg.eval_batches)
        meta = ExpertMeta(
            org=org,
            name=name,
            family=anchor.family.dense_model_type,
            anchor_digest=anchor.digest,
            shapes=anchor.shapes,
            data_commitment=commitment,
            training={
                "steps": steps_run,
                "tokens": steps_run * tokens_per_step,
                "final_loss": round(final_loss, 6),
                "val_loss_public": round(val_public, 6),
                "val_loss_expert": round(val_expert, 6),
                "seed": cfg.seed,
                "code_version": __version__,
                "documents": packed.num_documents,
                "hyperparameters": {
                    k: v for k, v in asdict(cfg).items() if k not in {"device", "checkpoint_every"}
                },
            },
            license=license,
        )
        write_bundle(out, extract_expert(model), meta, anchor)
        shutil.rmtree(state_dir, ignore_errors=True)
    # The other ranks wait here until rank 0 has written the bundle.
    val_public, val_expert = from_main(par, [val_public, val_expert])
    return TrainResult(
        out=out,
        steps=steps_run,
        tokens=steps_run * tokens_per_step,
        seconds=seconds,
        final_loss=final_loss,
        val_loss_public=val_public,
        val_loss_expert=val_expert,
        resumed_from=start,
        history=history,
        model=model,
        rank=par.rank,
        world_size=par.world_size,
    )


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
    accum = cfg.batch_size // cfg.micro_batch_size
    losses: list[float] = []
    with training_progress(
        cfg.max_steps, 0, cfg.batch_size * cfg.seq_len, enabled=progress
    ) as report:
        for step in range(cfg.max_steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr_at(step)
            idx = batch_indices(step, cfg.batch_size, len(train), cfg.seed)
            step_loss = 0.0
            for m in range(accum):
                ids = train[idx[m * cfg.micro_batch_size : (m + 1) * cfg.micro_batch_size]].to(
                    device
                )
                with _autocast(device):
                    loss = model(input_ids=ids, labels=ids).loss
                (loss / accum).backward()
                step_loss += float(loss.detach()) / accum
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            report(step + 1, step_loss)
    model.eval()  # type: ignore[no-untyped-call]  # PreTrainedModel.eval is unannotated
    return losses


def _router_init(
    cfg: TrainConfig,
    anchor: Anchor,
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    device: torch.device,
) -> list[torch.Tensor] | None:
    if cfg.router_init == "public":
        return None  # r_i = r_pub
    if cfg.router_init == "random":
        return random_router_init(anchor.shapes.hidden_size, anchor.shapes.num_layers, cfg.seed)
    if cfg.router_init == "embedder":
        from flexfed.common.embedder import mean_embedding, project

        projection = anchor.projection()  # the coordinator's map, shared by every owner
        sample = sample_documents(docs, cfg.router_init_documents, seed=cfg.seed)
        return project(projection, mean_embedding(sample), anchor.shapes.num_layers)
    dense = AutoModelForCausalLM.from_pretrained(anchor.path, dtype=torch.float32)
    dense.to(device)  # type: ignore[arg-type]  # transformers' @wraps'd .to
    sample = sample_documents(docs, cfg.router_init_documents, seed=cfg.seed)
    # r_i must live in the same space as the anchor's r_pub: the anchor records the norm its
    # router embeddings were scaled to (none recorded: raw means, as older anchors used).
    norm = (anchor.meta.get("embedder") or {}).get("norm")
    means = mlp_input_means(dense, tokenizer, sample, max_tokens=cfg.seq_len, norm=norm)
    del dense
    return means
