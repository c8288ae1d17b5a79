"""Expert-training throughput as a ratio to a dense full fine-tune of the same model, same tokens.

What is measured, with a model built in code (nothing is downloaded):

- **The public model.** A randomly initialised dense model of the chosen family (OLMo-2 by
  default: hidden 256, intermediate 1024, 4 layers, 4 heads, vocab 4096, about the demo's
  size), made an anchor with :func:`flexfed.common.public.tiny.build_anchor` (r_pub = seeded random
  vectors) in a temporary directory.
- **The tokens.** One tensor of random token ids, ``torch.randint`` from a fixed seed, shape
  (steps, batch, seq). Step k of either method trains on batch k, so both see the same tokens.
- **Expert training** (what ``flexfed client train`` runs per optimizer step, with the whole
  batch in one micro-batch, its default): the 2-expert model of
  :func:`flexfed.common.moe.training_model.build_training_model`, AdamW over
  :func:`~flexfed.common.moe.training_model.trainable_parameters` (the new FFN, r_i and b_i of every
  layer) with the trainer's recipe (:class:`flexfed.client.trainer.TrainConfig`: betas
  (0.9, 0.95), weight decay 0, its learning-rate schedule), forward with labels, loss =
  cross-entropy + 0.001 x router z-loss, backward, the loss read back as a float (the trainer
  logs it every step), gradient clipping at 1.0, step, ``zero_grad(set_to_none=True)``.
- **The baseline, a dense full fine-tune:** the anchor's dense model
  (``AutoModelForCausalLM``), every parameter trainable, the same optimizer recipe,
  cross-entropy only; the same step otherwise (as :func:`flexfed.client.trainer.train_dense`).

Both models and both optimizers live side by side in one process. After ``--warmup-steps``
untimed steps of each, the timed steps run in blocks of ``--block-steps`` (default 1: the
methods take turns step by step), alternating which method goes first (dense, expert, expert,
dense, dense, ...), so slow drift and other jobs on a shared machine fall on both alike. Every
step is timed on its own (``torch.cuda.synchronize`` around it on CUDA); tokens/s is batch x
seq over the median step time. The headline is the ratio of the medians, expert / dense. Two
noise gauges are printed beside it: the median of the ratios of neighbouring blocks (the same
batches, moments apart) and the ratio of each method's fastest step (other jobs only ever slow
a step down). On a busy machine ``--threads 1`` is steadier: with several threads every op
waits for the slowest one, and a thread that loses its core stalls the step.
fp32 on CPU; on CUDA the forward runs under ``torch.autocast("cuda", dtype=torch.bfloat16)``
like the trainer's, and both optimizers are ``fused`` AdamW (the trainer's choice on CUDA).

**Model FLOPs.** A weight matrix of n parameters applied to t tokens costs 2nt in the forward.
In the backward it costs 2nt for the gradient of its input, paid only if its input needs a
gradient (something trainable lies upstream of it), plus 2nt for its own gradient, paid only if
it trains. So a dense fine-tune costs the usual 6N per token. In expert training the frozen
matrices downstream of the first trainable one (the attention projections of layers 1.., every
public FFN from layer 1 on, lm_head) cost 2N + 2N, the trainable expert FFNs 2N + 4N, and the
frozen matrices upstream of every trainable one (layer 0's attention projections and its
public FFN) only their 2N forward: autograd never runs their backward. Per token:

    forward  = 2 * N_active                   (every matrix the forward touches: both FFNs)
    backward = 2 * N_frozen_on_path + 4 * N_trainable          (layer 0's expert: 2 N, not 4 N)
    + attention scores: 4 * T * d_attn per layer forward (QK^T and AV, full T x T as in the
      PaLM / Megatron MFU formula, no causal halving), 8 * T * d_attn backward where Q needs a
      gradient (every layer for the dense model, layers 1.. for the expert model)

N excludes the input embedding (a lookup, not a matmul); the router dot products (2 H per
token per router) and elementwise work (norms, activations, softmax, loss) are not counted.
The counts are not hard-coded: one untimed forward pass with hooks on every ``nn.Linear``
records n, t, whether the input requires a gradient and whether the weight does, so they are
exactly the matmuls autograd will run. ``--mfu`` (CUDA only) prints MFU = achieved model
FLOPs/s / ``--peak-tflops`` (default 989: H100 SXM dense BF16).

Memory: the table shows each method's weights + gradients + AdamW moments (exact, from the
tensors); the process's peak RSS (VmHWM; both models resident) is printed below it, and on
CUDA each method's peak allocated memory above the resting state (its activations and
gradients).

Run: ``.venv/bin/python benchmarks/train.py`` (defaults: 20 timed steps per method of 8 x 256
tokens; under a minute on 2 idle CPU cores, 1-3 minutes on a busy shared machine).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging as hf_logging

from flexfed.common.errors import FlexfedError
from flexfed.common.formats.anchor import Anchor
from flexfed.common.moe.config import TrainConfig
from flexfed.common.moe.recipe import resolve_device
from flexfed.common.moe.training_model import (
    build_training_model,
    router_z_loss,
    trainable_parameters,
)
from flexfed.common.public.tiny import build_anchor

MB = 10**6
FAMILIES = ("olmo2", "llama")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BenchConfig:
    """The model's shape, the batches and how the measurement is laid out."""

    family: str = "olmo2"
    hidden: int = 256
    intermediate: int = 1024
    layers: int = 4
    heads: int = 4
    vocab: int = 4096
    seq_len: int = 256
    batch_size: int = 8
    steps: int = 20
    warmup_steps: int = 3
    block_steps: int = 1
    threads: int = 0  # 0: torch's default
    device: str = "auto"
    seed: int = 0
    mfu: bool = False
    peak_tflops: float = 989.0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise SystemExit(f"--family must be one of {', '.join(FAMILIES)}")
        if self.device not in DEVICES:
            raise SystemExit(f"--device must be one of {', '.join(DEVICES)}")
        for name in ("hidden", "intermediate", "layers", "heads", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("steps", "block_steps"):
            if getattr(self, name) < 1:
                raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup_steps < 0 or self.threads < 0:
            raise SystemExit("--warmup-steps and --threads must be 0 or more")
        if self.hidden % self.heads:
            raise SystemExit(f"--hidden {self.hidden} must be a multiple of --heads {self.heads}")
        if self.vocab < 258:
            raise SystemExit("--vocab must be at least 258 (the byte tokenizer's 256 + EOS + pad)")
        if not self.peak_tflops > 0:
            raise SystemExit("--peak-tflops must be positive")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def model_overrides(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": max(512, self.seq_len),
        }


# --- model FLOPs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """Model FLOPs per token of one training step (see the module docstring)."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def count_flops(model: nn.Module, ids: torch.Tensor, device: torch.device) -> FlopCount:
    """Count the matmul FLOPs of a training step on ``ids`` (B, T) with one hooked forward."""
    fwd = bwd = 0

    def on_linear(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        nonlocal fwd, bwd
        assert isinstance(mod, nn.Linear)
        x = args[0]  # (..., in)
        flops = 2 * mod.in_features * mod.out_features * (x.numel() // mod.in_features)
        fwd += flops
        if x.requires_grad:  # gradient of the input: dX = dY W
            bwd += flops
        if mod.weight.requires_grad:  # gradient of the weight: dW = dY^T X
            bwd += flops

    def on_query(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        nonlocal fwd, bwd
        b, t = args[0].shape[:2]
        d = out.shape[-1]  # heads x head_dim
        fwd += 4 * b * t * t * d  # S = Q K^T and O = P V, 2 t t d each per sequence
        if out.requires_grad:  # dQ, dK from dS; dP, dV from dO
            bwd += 8 * b * t * t * d

    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(on_linear))
            if name.endswith("self_attn.q_proj"):
                hooks.append(mod.register_forward_hook(on_query))
    was = model.training
    model.train()
    try:
        with torch.enable_grad(), autocast(device):
            model(input_ids=ids.to(device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    tokens = ids.numel()
    return FlopCount(fwd / tokens, bwd / tokens)


# --- the two methods --------------------------------------------------------------------------


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA, as the trainer; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@dataclass
class Method:
    """One training setup: a model, its trainable tensors, its optimizer and its step times."""

    label: str
    model: PreTrainedModel
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    loss: Callable[[PreTrainedModel, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    steps_done: int = 0
    times: list[float] = field(default_factory=list)  # seconds of each timed step
    peak_extra: list[int] = field(default_factory=list)  # CUDA: peak bytes above resting

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def total(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def state_bytes(self) -> int:
        """Weights + gradients + both AdamW moments (the moments share the weight's dtype)."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + 3 * sum(p.numel() * p.element_size() for p in self.params)


def _optimizer(params: list[nn.Parameter], recipe: TrainConfig, device: torch.device) -> Any:
    return torch.optim.AdamW(
        params,
        lr=recipe.lr,
        betas=recipe.betas,
        weight_decay=recipe.weight_decay,
        fused=device.type == "cuda",
    )


def dense_method(anchor: Anchor, recipe: TrainConfig, device: torch.device) -> Method:
    model = AutoModelForCausalLM.from_pretrained(anchor.path, dtype=torch.float32)
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated .to() is mistyped
    model.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(m: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce = m(input_ids=ids, labels=ids).loss
        return ce, ce

    return Method("dense full fine-tune", model, params, _optimizer(params, recipe, device), loss)


def expert_method(anchor: Anchor, recipe: TrainConfig, device: torch.device) -> Method:
    model = build_training_model(anchor, device=device)
    model.train()
    params = trainable_parameters(model)

    def loss(m: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ce = m(input_ids=ids, labels=ids).loss
        return ce + recipe.z_loss_weight * router_z_loss(m), ce

    return Method("expert (2-expert FFN)", model, params, _optimizer(params, recipe, device), loss)


def train_step(
    method: Method, ids: torch.Tensor, recipe: TrainConfig, device: torch.device
) -> float:
    """One optimizer step, as the trainer takes it; returns its wall-clock seconds."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for group in method.opt.param_groups:
        group["lr"] = recipe.lr_at(method.steps_done)
    batch = ids.to(device)  # (B, T)
    with autocast(device):
        loss, ce = method.loss(method.model, batch)
    torch.autograd.backward(loss)
    float(ce.detach())  # the trainer reads the loss back every step (a device sync on CUDA)
    torch.nn.utils.clip_grad_norm_(method.params, recipe.grad_clip)
    method.opt.step()
    method.opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    method.steps_done += 1
    return time.perf_counter() - t0


def run_block(
    method: Method,
    batches: torch.Tensor,
    recipe: TrainConfig,
    device: torch.device,
    timed: bool,
) -> float:
    """Train ``method`` on each of ``batches`` (n, B, T); return the block's seconds."""
    cuda = device.type == "cuda"
    if cuda and timed:
        resting = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = 0.0
    for ids in batches:
        dt = train_step(method, ids, recipe, device)
        seconds += dt
        if timed:
            method.times.append(dt)
    if cuda and timed:
        method.peak_extra.append(torch.cuda.max_memory_allocated(device) - resting)
    return seconds


# --- memory -----------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    # NOTE: ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Results:
    cfg: BenchConfig
    device: torch.device
    dense: Method
    expert: Method
    flops: dict[str, FlopCount]
    pairs: list[float]  # per block pair: expert tokens/s / dense tokens/s
    load: tuple[float, float]
    peak_rss: int


def run(cfg: BenchConfig, root: Path) -> Results:
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.mfu and device.type != "cuda":
        print("note: --mfu is reported on CUDA only; showing achieved FLOP/s", file=sys.stderr)
    anchor = build_anchor(cfg.family, root / "anchor", seed=cfg.seed, **cfg.model_overrides())
    total = cfg.warmup_steps + cfg.steps
    recipe = TrainConfig(
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        micro_batch_size=cfg.batch_size,
        max_steps=total,
        device=cfg.device,
        seed=cfg.seed,
    )
    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(
        cfg.vocab, (cfg.steps, cfg.batch_size, cfg.seq_len), generator=g
    )  # (steps, B, T)

    dense = dense_method(anchor, recipe, device)
    expert = expert_method(anchor, recipe, device)
    flops = {m.label: count_flops(m.model, tokens[0, :1], device) for m in (dense, expert)}

    load_start = os.getloadavg()[0]
    # Warm-up, untimed: allocator, kernels, AdamW state. Batches cycle through the timed ones.
    warm = tokens[torch.arange(cfg.warmup_steps) % cfg.steps]  # (warmup, B, T)
    for m in (dense, expert):
        run_block(m, warm, recipe, device, timed=False)

    pairs: list[float] = []
    blocks = -(-cfg.steps // cfg.block_steps)
    for k, start in enumerate(range(0, cfg.steps, cfg.block_steps)):
        block = tokens[start : start + cfg.block_steps]
        # NOTE: alternating who goes first (D E, E D, D E, ...) puts a slow stretch of the
        # shared machine as often just before as just after each method's block.
        first, second = (dense, expert) if k % 2 == 0 else (expert, dense)
        seconds = {
            m.label: run_block(m, block, recipe, device, timed=True) for m in (first, second)
        }
        pairs.append(seconds[dense.label] / seconds[expert.label])  # same tokens in both
        times = ", ".join(f"{m.label.split()[0]} {seconds[m.label]:.2f} s" for m in (first, second))
        print(f"block {k + 1}/{blocks}: {times}", file=sys.stderr)
    load = (load_start, os.getloadavg()[0])
    return Results(cfg, device, dense, expert, flops, pairs, load, peak_rss_bytes())


def tokens_per_s(cfg: BenchConfig, m: Method) -> float:
    """Tokens per second at the median step time."""
    return cfg.tokens_per_step / statistics.median(m.times)


def best_tokens_per_s(cfg: BenchConfig, m: Method) -> float:
    """Tokens per second of the fastest step."""
    return cfg.tokens_per_step / min(m.times)


def report(r: Results) -> str:
    cfg = r.cfg
    cuda = r.device.type == "cuda"
    show_mfu = cfg.mfu and cuda
    precision = "bf16 autocast" if cuda else "fp32"
    threads = "" if cuda else f" ({torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs)"
    head = (
        f"{'method':<24}{'trainable':>12}{'of all':>8}{'ms/step':>9}{'tokens/s':>10}"
        f"{'p25-p75 tok/s':>16}{'best tok/s':>12}{'MFLOP/tok':>11}{'GFLOP/s':>10}"
        + (f"{'MFU':>8}" if show_mfu else "")
        + f"{'state MB':>10}"
    )
    lines = [
        f"expert-training benchmark: {cfg.family}, {cfg.layers} layers, hidden {cfg.hidden}, "
        f"intermediate {cfg.intermediate}, {cfg.heads} heads, vocab {cfg.vocab}",
        f"{cfg.batch_size} x {cfg.seq_len} = {cfg.tokens_per_step} tokens per step; "
        f"{cfg.steps} timed steps per method after {cfg.warmup_steps} warm-up, in alternating "
        f"blocks of {cfg.block_steps} (D E, E D, D E, ...)",
        f"device {r.device}{threads}, {precision}; 1-minute load average at start "
        f"{r.load[0]:.2f}, at end {r.load[1]:.2f} (other work on the machine adds noise)",
        "",
        head,
    ]
    for m in (r.dense, r.expert):
        tps = tokens_per_s(cfg, m)
        q = statistics.quantiles(m.times, n=4) if len(m.times) > 1 else [m.times[0]] * 3
        spread = f"{cfg.tokens_per_step / q[2]:,.0f}-{cfg.tokens_per_step / q[0]:,.0f}"
        fl = r.flops[m.label]
        achieved = fl.total * tps
        row = (
            f"{m.label:<24}{m.trainable():>12,}{m.trainable() / m.total():>8.1%}"
            f"{1e3 * statistics.median(m.times):>9.0f}{tps:>10,.0f}{spread:>16}"
            f"{best_tokens_per_s(cfg, m):>12,.0f}"
            f"{fl.total / 1e6:>11.1f}{achieved / 1e9:>10,.1f}"
        )
        if show_mfu:
            row += f"{achieved / (cfg.peak_tflops * 1e12):>8.2%}"
        lines.append(row + f"{m.state_bytes() / MB:>10.1f}")
    ratio = tokens_per_s(cfg, r.expert) / tokens_per_s(cfg, r.dense)
    best = best_tokens_per_s(cfg, r.expert) / best_tokens_per_s(cfg, r.dense)
    fd, fe = r.flops[r.dense.label], r.flops[r.expert.label]
    lines += [
        "",
        f"model FLOPs per token (forward + backward): dense {fd.forward / 1e6:.1f} + "
        f"{fd.backward / 1e6:.1f} M, expert {fe.forward / 1e6:.1f} + {fe.backward / 1e6:.1f} M; "
        f"at equal FLOP/s expert/dense would be {fd.total / fe.total:.2f}",
        "  (2 n per matrix forward; backward 2 n for its input's gradient where that is needed "
        "and 2 n for its own where it trains; plus attention scores)",
        f"process peak RSS {peak_mb(r.peak_rss)} (both models and optimizers resident)",
    ]
    if cuda:
        extra = ", ".join(f"{m.label} {max(m.peak_extra) / MB:.0f} MB" for m in (r.dense, r.expert))
        lines.append(f"CUDA peak allocated above resting, per step: {extra}")
    if show_mfu:
        lines.append(f"MFU against a peak of {cfg.peak_tflops:g} TFLOP/s")
    lines += [
        f"expert/dense per block pair: {', '.join(f'{x:.2f}' for x in r.pairs)}",
        f"noise gauges: median of the block-pair ratios {statistics.median(r.pairs):.2f}; "
        f"ratio of the fastest steps {best:.2f}",
        f"ratio expert/dense tokens/s (medians): {ratio:.2f}",
    ]
    return "\n".join(lines)


def peak_mb(n: int) -> str:
    return f"{n / MB:,.0f} MB"


def parse_args(argv: Sequence[str]) -> BenchConfig:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    d = BenchConfig()
    p.add_argument("--family", default=d.family, choices=FAMILIES)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per method")
    p.add_argument(
        "--warmup-steps", type=int, default=d.warmup_steps, help="untimed steps per method first"
    )
    p.add_argument(
        "--block-steps", type=int, default=d.block_steps, help="steps per interleaved block"
    )
    p.add_argument(
        "--threads", type=int, default=d.threads, help="CPU threads (default: torch's choice)"
    )
    p.add_argument("--device", default=d.device, choices=DEVICES)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mfu", action="store_true", help="print model FLOPs utilisation (CUDA)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=d.peak_tflops,
        help="the device's peak for --mfu (default 989: H100 SXM dense BF16)",
    )
    a = p.parse_args(argv)
    # NOTE: every option's dest is the name of a BenchConfig field.
    return BenchConfig(**{f.name: getattr(a, f.name) for f in fields(BenchConfig)})


def main(argv: Sequence[str]) -> None:
    cfg = parse_args(argv)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with tempfile.TemporaryDirectory(prefix="flexfed-bench-train-") as tmp:
        try:
            results = run(cfg, Path(tmp))
        except FlexfedError as err:
            raise SystemExit(f"error: {err}") from err
    print(report(results))


if __name__ == "__main__":
    main(sys.argv[1:])
