"""Packing documents into training sequences, with a held-out split by document.

Typical use, the one call a trainer makes::

    packed, digest, manifest = load_training_data(paths, tokenizer, seq_len=1024)
"""

from __future__ import annotations

import hashlib
import logging
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from flexfed.common.data.documents import (
    FORMATS_HINT,
    data_commitment,
    find_data_files,
    read_documents,
)
from flexfed.common.errors import ConfigError, DataError, UnsupportedModelError

logger = logging.getLogger(__name__)

# Tokenizer batches: large enough for the fast tokenizer's parallelism, small enough that
# max_tokens does not make us tokenise much more than we keep.
_TOKENIZE_BATCH_DOCS = 512
_TOKENIZE_BATCH_CHARS = 2_000_000
# The progress bar is noise for small inputs (tests, the quick demo).
_PROGRESS_MIN_BYTES = 1 << 20


# --- packing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedData:
    """Token sequences ready for training: fixed length, documents separated by EOS."""

    train: torch.Tensor  # (N_train, seq_len) int64
    val: torch.Tensor  # (N_val, seq_len) int64
    num_documents: int  # non-empty documents read (the last one may be cut by max_tokens)
    num_tokens: int  # tokens in train and val: (N_train + N_val) * seq_len
    seq_len: int


class _Stream:
    """A growing token stream that remembers where each document starts."""

    def __init__(self) -> None:
        self.tokens: array[int] = array("q")
        self.starts: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, ids: Sequence[int]) -> None:
        self.starts.append(len(self.tokens))
        self.tokens.extend(ids)

    def extend(self, other: _Stream) -> None:
        offset = len(self.tokens)
        self.starts += [s + offset for s in other.starts]
        self.tokens.extend(other.tokens)

    def split(self, at: int) -> tuple[_Stream, _Stream]:
        head, tail = _Stream(), _Stream()
        head.tokens, tail.tokens = self.tokens[:at], self.tokens[at:]
        head.starts = [s for s in self.starts if s < at]
        tail.starts = [s - at for s in self.starts if s >= at]
        return head, tail

    def pack(self, seq_len: int) -> torch.Tensor:
        n = len(self.tokens) // seq_len  # the ragged tail is dropped
        if n == 0:
            return torch.empty((0, seq_len), dtype=torch.int64)
        flat = torch.frombuffer(self.tokens, dtype=torch.int64, count=n * seq_len)
        return flat.view(n, seq_len).clone()  # clone: own the memory, not the array's


def is_validation_document(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split.

    True iff the first 8 bytes of SHA-256(UTF-8 text), read as a big-endian integer, mod
    10_000 is below ``val_fraction * 10_000``: deterministic, independent of document order,
    and the same document always lands on the same side.
    """
    head = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()[:8]
    return int.from_bytes(head, "big") % 10_000 < val_fraction * 10_000


def pack_documents(
    docs: Iterable[str],
    tokenizer: Any,
    seq_len: int,
    val_fraction: float = 0.05,
    max_tokens: int | None = None,
    min_val_sequences: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> PackedData:
    """Tokenise documents and pack them into fixed-length training and validation sequences.

    Each document is tokenised with ``tokenizer(text, add_special_tokens=False)`` (in
    batches) and followed by ``tokenizer.eos_token_id``. Documents are split by
    :func:`is_validation_document` into a train and a validation stream, so no document
    leaks across; each stream is concatenated and cut into rows of ``seq_len`` tokens, its
    ragged tail dropped. With ``max_tokens``, reading stops after that many tokens (the last
    document is cut), so ``num_tokens <= max_tokens``. ``progress(docs, tokens)`` is called
    after each tokenised batch with the counts so far.

    If the validation stream makes fewer than one sequence (few documents, small
    ``val_fraction``) and ``val_fraction > 0``, validation is carved from the end of the train
    stream: whole documents, cut at a document start, so that it makes ``min_val_sequences``
    sequences and train keeps at least one. Only if no document start allows that are the
    last ``min_val_sequences`` train sequences taken as they are, and those may share a
    document with the last train sequence. Train always keeps one sequence, so validation can
    still be empty (with a warning) when there is text for just one sequence. If every
    document hashed to validation, they all go to train first. ``val_fraction = 0`` means no
    validation at all.

    Raises :class:`DataError` if there is not enough text for one training sequence.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be at least 2, got {seq_len}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be positive, got {max_tokens}")
    if min_val_sequences < 0:
        raise ConfigError(f"min_val_sequences must be >= 0, got {min_val_sequences}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise UnsupportedModelError(
            "the tokenizer has no end-of-text token (eos_token_id); documents could not be "
            "separated. Set eos_token in the public model's tokenizer_config.json"
        )

    train, val = _Stream(), _Stream()
    num_documents = 0
    total = 0
    budget = max_tokens if max_tokens is not None else sys.maxsize
    for batch in _batches(docs):
        ids_batch = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for text, ids in zip(batch, ids_batch, strict=True):
            ids = [*ids, eos][: budget - total]
            to_val = val_fraction > 0 and is_validation_document(text, val_fraction)
            (val if to_val else train).add(ids)
            num_documents += 1
            total += len(ids)
            if total >= budget:
                break
        if progress is not None:
            progress(num_documents, total)
        if total >= budget:
            logger.info("stopped reading at max_tokens=%d", budget)
            break

    if num_documents == 0:
        raise DataError(
            "found no text: every document was empty; check that --data points at the "
            f"training data ({FORMATS_HINT})"
        )
    if len(train) < seq_len:
        # Few documents, all or most hashed to validation: training comes first.
        train.extend(val)
        val = _Stream()
    if len(train) < seq_len:
        raise DataError(
            f"not enough text for one training sequence: found {total:,} tokens in "
            f"{num_documents:,} document(s), need at least {seq_len:,} (seq_len). "
            "Use a smaller --seq-len or add more data"
        )
    want_val = val_fraction > 0 and min_val_sequences > 0
    if want_val and len(val) < seq_len:
        train, val = _carve_validation(train, val, seq_len, min_val_sequences)
    train_rows, val_rows = train.pack(seq_len), val.pack(seq_len)  # (N, seq_len) each
    if want_val and len(val_rows) == 0:
        train_rows, val_rows = _last_sequences(train_rows, min_val_sequences)
    if want_val and len(val_rows) == 0:
        logger.warning("not enough text for a validation sequence; validation is empty")

    packed = PackedData(
        train=train_rows,
        val=val_rows,
        num_documents=num_documents,
        num_tokens=(len(train_rows) + len(val_rows)) * seq_len,
        seq_len=seq_len,
    )
    logger.info(
        "packed %d document(s) into %d train + %d validation sequence(s) of %d tokens",
        num_documents,
        len(train_rows),
        len(val_rows),
        seq_len,
    )
    return packed


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in docs:
        if not text.strip():
            continue
        batch.append(text)
        chars += len(text)
        if len(batch) >= _TOKENIZE_BATCH_DOCS or chars >= _TOKENIZE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _carve_validation(
    train: _Stream, val: _Stream, seq_len: int, min_val_sequences: int
) -> tuple[_Stream, _Stream]:
    """Move whole documents from the end of train into val until val fills its sequences.

    Cuts at the latest document start that gives val enough tokens while train keeps at
    least one sequence; returns the streams unchanged if there is none.
    """
    need = min_val_sequences * seq_len - len(val)
    for start in reversed(train.starts):
        if len(train) - start >= need:
            if start < seq_len:
                break
            head, tail = train.split(start)
            tail.extend(val)
            return head, tail
    return train, val


def _last_sequences(train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split off the last ``k`` train rows as validation, keeping at least one train row."""
    k = min(k, len(train) - 1)
    if k <= 0:
        return train, train[:0]
    logger.warning(
        "no document boundary allows a validation split; using the last %d train sequence(s) "
        "as validation (they may share a document with training)",
        k,
    )
    return train[:-k], train[-k:]


# --- the one call the trainer makes -------------------------------------------------------


def load_training_data(
    paths: Sequence[Path | str],
    tokenizer: Any,
    seq_len: int,
    val_fraction: float = 0.05,
    max_tokens: int | None = None,
) -> tuple[PackedData, str, dict[str, Any]]:
    """Find, commit to, read and pack the owner's data: ``(packed, digest, manifest)``.

    ``digest`` and ``manifest`` are :func:`data_commitment` over every file found, whether or
    not ``max_tokens`` stopped reading before its end. A progress bar on stderr shows
    tokenisation of larger inputs when stderr is a terminal.
    """
    files = find_data_files(paths)
    digest, manifest = data_commitment(files)
    total_bytes = sum(entry["size"] for entry in manifest["files"])
    logger.info("data commitment %s over %d file(s), %d bytes", digest, len(files), total_bytes)
    enabled = total_bytes >= _PROGRESS_MIN_BYTES and sys.stderr.isatty()
    with _tokenise_progress(enabled, max_tokens) as progress:
        packed = pack_documents(
            read_documents(files),
            tokenizer,
            seq_len,
            val_fraction=val_fraction,
            max_tokens=max_tokens,
            progress=progress,
        )
    return packed, digest, manifest


@contextmanager
def _tokenise_progress(
    enabled: bool, max_tokens: int | None
) -> Iterator[Callable[[int, int], None] | None]:
    """A rich bar on stderr counting documents and tokens (None when not enabled)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        SpinnerColumn(),
        TextColumn("Tokenising: {task.fields[docs]:,} documents, {task.completed:,} tokens"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task("tokenise", total=max_tokens, docs=0)

        def update(docs: int, tokens: int) -> None:
            progress.update(task, completed=tokens, docs=docs)

        yield update
