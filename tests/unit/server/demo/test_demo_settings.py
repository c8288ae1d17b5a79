"""The demo's presets and the way it drives ``flexfed client train``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flexfed.client.cli import train
from flexfed.common.errors import ConfigError
from flexfed.server.demo.local import (
    EXPERT_OPTIONS,
    PUBLIC_MODELS,
    DemoSettings,
    _flags,
)

FLEXFED = str(Path(sys.executable).parent / "flexfed")


def test_every_option_the_demo_passes_is_a_flag_of_client_train() -> None:
    s = DemoSettings.preset(quick=True)
    options = {
        "public": "A",
        "data": "D",
        "org": "o",
        "name": "n",
        "out": "E",
        "max_steps": s.expert_steps,
        "seq_len": s.seq_len,
        "batch_size": s.batch_size,
        "lr": s.lr,
        "router_init_documents": s.router_documents,
        "eval_batches": s.eval_batches,
        "device": "cpu",
        **EXPERT_OPTIONS,
    }
    known = {opt for param in train.params for opt in getattr(param, "opts", [])}
    flags = [f for f in _flags(options) if f.startswith("--")]
    assert set(flags) <= known, set(flags) - known


@pytest.mark.parametrize("quick", [True, False])
def test_presets_of_every_public_model(quick: bool) -> None:
    for public in PUBLIC_MODELS:
        s = DemoSettings.preset(quick, public)
        assert s.public_model == public
        assert s.expert_steps > 0 and s.eval_sequences > 0 and s.router_documents > 0
    smol = DemoSettings.preset(quick, "smollm2")
    assert (smol.hidden_size, smol.layers, smol.vocab_size) == (576, 30, 49152)  # SmolLM2-135M
    assert smol.public_steps == 0  # pretrained: flexfed does not train it


def test_an_unknown_public_model_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="unknown public model 'gpt5'"):
        DemoSettings.preset(False, "gpt5")
    proc = subprocess.run([FLEXFED, "demo", "--public", "gpt5"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "gpt5" in proc.stderr
