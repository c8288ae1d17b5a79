"""A training run's resumable state: ``<out>.train-state/``, claimed by one run, newest wins.

Every ``checkpoint_every`` steps rank 0 writes the trainable tensors and the optimizer moments
(safetensors, never pickle) and the progress so far into a fresh folder, then renames it over
``latest``. ``run.json`` records what the run is (settings, anchor, data commitment, org): a
rerun of the same command resumes, any other run is refused instead of silently mixing states.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from flexfed.client.parallel import DataParallel, agree
from flexfed.common.errors import ConfigError
from flexfed.common.formats.safetensors_io import load_tensors, save_tensors
from flexfed.common.util.jsonio import write_json


def state_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.train-state"


def open_state_dir(state_dir: Path, fingerprint: dict[str, Any], par: DataParallel) -> None:
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


def save_state(
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


def load_state(
    state_dir: Path, model: PreTrainedModel, opt: torch.optim.Optimizer
) -> dict[str, Any] | None:
    """Load the newest state into ``model`` and ``opt``; its progress, or None if there is none."""
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
