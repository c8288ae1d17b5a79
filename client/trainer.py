"""The local expert trainer: what ``flexfed client train`` runs behind the owner's firewall.

The recipe is the paper's (:mod:`flexfed.common.moe.recipe`) on the 2-expert model of
:mod:`flexfed.common.moe.training_model`. :func:`train_expert` reads top to bottom as four
steps: prepare (anchor, data, model, optimizer), resume (from the last checkpoint, if any),
the loop, and finish (held-out loss, the bundle).

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

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from flexfed.client.parallel import (
    DataParallel,
    agree,
    data_parallel,
    from_main,
    mean_over_ranks,
    per_process_batch,
    wrap_for_training,
)
from flexfed.client.train_state import load_state, open_state_dir, save_state, state_dir_for
from flexfed.common import __version__
from flexfed.common.data.documents import data_commitment, find_data_files, read_documents
from flexfed.common.data.packing import PackedData, pack_documents
from flexfed.common.errors import ConfigError, OutputExistsError
from flexfed.common.formats.anchor import Anchor, open_anchor
from flexfed.common.formats.bundle import ExpertMeta, write_bundle
from flexfed.common.formats.names import NAME_RULE, ORG_PATTERN
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.evaluation import load_tokenizer as load_model_tokenizer
from flexfed.common.moe.privacy import DPPlan, plan_dp, poisson_sample, private_gradients
from flexfed.common.moe.recipe import (
    accumulate_gradients,
    autocast,
    batch_indices,
    evaluate,
    optimizer_step,
    set_lr,
)
from flexfed.common.moe.router_init import mlp_input_means, random_router_init, sample_documents
from flexfed.common.moe.training_model import (
    build_training_model,
    extract_expert,
    trainable_parameters,
    two_expert_layers,
    z_loss_term,
)
from flexfed.common.util.progress import console, training_progress

log = logging.getLogger(__name__)

# Settings that do not change what is trained: a run may resume with other values of these.
_RUNTIME_ONLY = frozenset({"checkpoint_every", "device"})


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


@dataclass
class _Run:
    """One training run in progress: what :func:`_prepare` builds and the later steps use."""

    cfg: TrainConfig
    org: str
    name: str
    license: str
    out: Path
    par: DataParallel
    progress: bool
    anchor: Anchor
    commitment: str
    packed: PackedData
    state_dir: Path
    model: PreTrainedModel
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    share: int  # sequences of each step's batch this process runs
    micro: int  # sequences per forward pass
    start: int = 0  # the step this process starts (or resumes) at
    val_public: float = float("nan")  # held-out loss before training (rank 0)
    history: list[float] = field(default_factory=list)
    dp: DPPlan | None = None  # differentially private training (DP-SGD), if asked for

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len


def load_tokenizer(anchor: Anchor) -> PreTrainedTokenizerBase:
    """The anchor's tokenizer (see :func:`flexfed.common.moe.evaluation.load_tokenizer`)."""
    return load_model_tokenizer(anchor.path)


def train_expert(
    public: Path | str,
    data: Sequence[Path | str],
    org: str,
    out: Path | str,
    cfg: TrainConfig | None = None,
    name: str = "expert",
    license: str = "proprietary; no use without the owner's consent",
    progress: bool = True,
) -> TrainResult:
    """Train one expert on local data and write its bundle to ``out``.

    Under ``torchrun`` with several processes every process calls this with the same
    arguments: they train one model data-parallel, and only rank 0 writes ``out``.
    """
    out = Path(out)
    cfg = cfg if cfg is not None else TrainConfig()
    if not ORG_PATTERN.fullmatch(org):
        raise ConfigError(f"--org {org!r} must be {NAME_RULE}")
    if not ORG_PATTERN.fullmatch(name):
        raise ConfigError(f"--name {name!r} must be {NAME_RULE}")
    with data_parallel(cfg.device) as par:
        run = _prepare(public, data, org, out, cfg, name, license, progress and par.is_main, par)
        _resume(run)
        seconds = _loop(run)
        return _finish(run, seconds)


# --- 1. prepare: anchor, data, state, model, optimizer ---------------------------------------


def _prepare(
    public: Path | str,
    data: Sequence[Path | str],
    org: str,
    out: Path,
    cfg: TrainConfig,
    name: str,
    license: str,
    progress: bool,
    par: DataParallel,
) -> _Run:
    share, micro = per_process_batch(cfg, par.world_size)
    anchor = open_anchor(public)
    _check_writable(out)
    tokenizer = load_tokenizer(anchor)
    torch.manual_seed(cfg.seed)

    files = find_data_files(data)
    commitment, _manifest = data_commitment(files)
    docs = list(read_documents(files))
    packed = pack_documents(docs, tokenizer, cfg.seq_len, cfg.val_fraction, cfg.max_tokens)
    log.info("data: %d documents, %d train sequences", packed.num_documents, len(packed.train))

    state_dir = state_dir_for(out)
    open_state_dir(state_dir, _fingerprint(cfg, anchor, commitment, org), par)

    # NOTE: every rank computes the router init (a deterministic function of the data and the
    # seed, as cheap in parallel as on one rank); DDP then makes rank 0's copy everyone's.
    router_init = _router_init(cfg, anchor, tokenizer, docs, par.device)
    model = build_training_model(anchor, router_init, cfg.bias_init, device=par.device)
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
    dp = None
    if cfg.dp_epsilon is not None:
        if par.world_size > 1:
            raise ConfigError("--dp-epsilon trains in one process; run it without torchrun")
        records = len(packed.train)
        dp = plan_dp(
            cfg.dp_epsilon, cfg.dp_delta, cfg.dp_max_grad_norm, cfg.batch_size, records,
            cfg.max_steps,
        )  # fmt: skip
        log.info("DP-SGD: noise multiplier %.4f, sample rate %.5f", dp.noise_multiplier,
                 dp.sample_rate)  # fmt: skip
    opt = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=cfg.betas,
        weight_decay=cfg.weight_decay,
        fused=par.device.type == "cuda",
    )
    return _Run(
        cfg, org, name, license, out, par, progress, anchor, commitment, packed, state_dir,
        model, params, opt, share, micro, dp=dp,
    )  # fmt: skip


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


def _fingerprint(cfg: TrainConfig, anchor: Anchor, commitment: str, org: str) -> dict[str, Any]:
    keep = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_ONLY}
    return {
        "config": keep,
        "anchor_digest": anchor.digest,
        "data_commitment": commitment,
        "org": org,
    }


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
        from flexfed.common.moe.embedder import mean_embedding, project

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


# --- 2. resume: the last checkpoint of this run, if any ---------------------------------------


def _resume(run: _Run) -> None:
    # Every rank loads the same state (rank 0 writes it only between steps, in the loop).
    resumed = load_state(run.state_dir, run.model, run.opt)
    run.start = int(resumed["step"]) if resumed else 0
    agree(run.par, run.start, "the step to resume from")
    if resumed:
        run.val_public = float(resumed["val_loss_public"])
        run.history = list(resumed.get("history", []))
    elif run.par.is_main:
        run.val_public = _evaluate(run)
    # else: rank 0's value arrives at the end (_finish)


def _evaluate(run: _Run) -> float:
    cfg = run.cfg
    return evaluate(
        run.model, run.packed.val, cfg.micro_batch_size, run.par.device, cfg.eval_batches
    )


# --- 3. the loop ------------------------------------------------------------------------------


def _loop(run: _Run) -> float:
    """Train from ``run.start`` to ``max_steps``; checkpoint on the way. Returns seconds."""
    cfg, par, model = run.cfg, run.par, run.model
    forward, ddp = wrap_for_training(model, cfg, par)
    if run.progress:
        where = f"resuming at step {run.start}" if run.start else "starting"
        ranks = f" on {par.world_size} processes" if par.enabled else ""
        console.print(f"{run.org}/{run.name}: {where}{ranks}; resumable state in {run.state_dir}")
    first = par.rank * run.share  # this rank's share: sequences [first, first + share)
    train = run.packed.train
    t0 = time.monotonic()
    with training_progress(
        cfg.max_steps, run.start, run.tokens_per_step, enabled=run.progress
    ) as report:
        for step in range(run.start, cfg.max_steps):
            set_lr(run.opt, cfg, step)
            if run.dp is not None:
                step_loss = _private_step(run, forward, step)
            else:
                idx = batch_indices(step, cfg.batch_size, len(train), cfg.seed)
                batch = train[idx[first : first + run.share]]  # (share, T): this rank's share
                z_loss = z_loss_term(model, cfg.z_loss_weight)
                step_loss = accumulate_gradients(forward, batch, run.micro, par.device, z_loss, ddp)
                [step_loss] = mean_over_ranks(par, [step_loss])
                optimizer_step(run.opt, run.params, cfg.grad_clip)
            run.history.append(step_loss)
            report(step + 1, step_loss)
            done = step + 1
            if done % cfg.checkpoint_every == 0 and done < cfg.max_steps:
                if par.is_main:
                    info = {"val_loss_public": run.val_public, "history": run.history}
                    save_state(run.state_dir, model, run.opt, done, info)
                par.barrier()
    return time.monotonic() - t0


def _private_step(run: _Run, forward: nn.Module, step: int) -> float:
    """One DP-SGD step (:mod:`flexfed.common.moe.privacy`): a Poisson sample, per-sequence
    clipped gradients plus noise, then the optimizer (no further clipping: it would rescale the
    noise). Returns the sampled sequences' mean loss."""
    cfg, plan, device = run.cfg, run.dp, run.par.device
    assert plan is not None
    z_loss = z_loss_term(run.model, cfg.z_loss_weight)

    def loss_of(ids: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            loss: torch.Tensor = forward(input_ids=ids, labels=ids).loss + z_loss()
        return loss

    batch = run.packed.train[poisson_sample(plan, step, cfg.seed)]
    step_loss = private_gradients(plan, run.params, loss_of, batch, step, cfg.seed, device)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return step_loss


# --- 4. finish: held-out loss, the bundle ------------------------------------------------------


def _finish(run: _Run, seconds: float) -> TrainResult:
    cfg, par = run.cfg, run.par
    steps = cfg.max_steps
    final_loss = run.history[-1] if run.history else float("nan")
    val_public, val_expert = run.val_public, float("nan")
    if par.is_main:
        val_expert = _evaluate(run)
        write_bundle(
            run.out, extract_expert(run.model), _meta(run, final_loss, val_expert), run.anchor
        )
        shutil.rmtree(run.state_dir, ignore_errors=True)
    # The other ranks wait here until rank 0 has written the bundle.
    val_public, val_expert = from_main(par, [val_public, val_expert])
    return TrainResult(
        out=run.out,
        steps=steps,
        tokens=steps * run.tokens_per_step,
        seconds=seconds,
        final_loss=final_loss,
        val_loss_public=val_public,
        val_loss_expert=val_expert,
        resumed_from=run.start,
        history=run.history,
        model=run.model,
        rank=par.rank,
        world_size=par.world_size,
    )


def _meta(run: _Run, final_loss: float, val_expert: float) -> ExpertMeta:
    cfg, anchor = run.cfg, run.anchor
    return ExpertMeta(
        org=run.org,
        name=run.name,
        family=anchor.family.dense_model_type,
        anchor_digest=anchor.digest,
        shapes=anchor.shapes,
        data_commitment=run.commitment,
        training={
            "steps": cfg.max_steps,
            "tokens": cfg.max_steps * run.tokens_per_step,
            "final_loss": round(final_loss, 6),
            "val_loss_public": round(run.val_public, 6),
            "val_loss_expert": round(val_expert, 6),
            "seed": cfg.seed,
            "code_version": __version__,
            "documents": run.packed.num_documents,
            "hyperparameters": {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_ONLY},
            **(
                {"differential_privacy": run.dp.record(cfg.max_steps)} if run.dp is not None else {}
            ),
        },
        license=run.license,
    )


__all__ = ["TrainConfig", "TrainResult", "load_tokenizer", "state_dir_for", "train_expert"]
