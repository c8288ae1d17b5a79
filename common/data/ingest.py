"""Data ingestion for the local expert trainer: find, commit to, read and pack an owner's data.

The data never leaves the owner. What leaves is :func:`data_commitment`: the SHA-256 of a
manifest of the files trained on (relative path, SHA-256, size), so the owner can later prove
which data an expert was trained on without showing it.

Accepted inputs (``--data``): plain-text files (any extension), ``.jsonl`` / ``.json`` files
whose records carry a ``text`` field, ``.parquet`` files with a ``text`` column, or folders of
those (recursive, sorted, hidden entries skipped, binary files skipped).

Typical use, the one call the trainer makes::

    packed, digest, manifest = load_training_data(paths, tokenizer, seq_len=1024)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from array import array
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from flexfed.common.errors import ConfigError, DataError, UnsupportedModelError
from flexfed.common.util.digest import sha256_file

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "flexfed.data-manifest/v1"
TEXT_FIELD = "text"
# NOTE: a plain-text file is one document, but a multi-gigabyte dump is not: it is split at
# blank lines into documents of at most about this many characters, so the validation split
# (by document) still works and no single tokenizer call holds the whole file.
MAX_DOCUMENT_CHARS = 100_000

_JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
_JSON_SUFFIX = ".json"
_PARQUET_SUFFIX = ".parquet"
_SNIFF_BYTES = 8192
_PARQUET_BATCH_ROWS = 4096
# Tokenizer batches: large enough for the fast tokenizer's parallelism, small enough that
# max_tokens does not make us tokenise much more than we keep.
_TOKENIZE_BATCH_DOCS = 512
_TOKENIZE_BATCH_CHARS = 2_000_000
# The progress bar is noise for small inputs (tests, the quick demo).
_PROGRESS_MIN_BYTES = 1 << 20
_FORMATS_HINT = (
    "flexfed reads plain-text files, .jsonl/.json files with a 'text' field, "
    ".parquet files with a 'text' column, or folders of those"
)


# --- finding files -------------------------------------------------------------------------


def find_data_files(paths: Sequence[Path | str]) -> list[Path]:
    """Expand ``--data`` arguments into the list of data files to read.

    Each path is a file (plain text of any extension, ``.jsonl``, ``.json`` or ``.parquet``)
    or a folder, searched recursively in sorted order of relative path; inside a folder,
    hidden files and folders (name starting with ``.``) and binary files (a NUL byte in the
    first 8 KiB) are skipped. A file named twice is listed once. Files are returned in
    argument order, each folder's files sorted.

    Checked here, before any work starts: every path exists, every folder holds at least one
    usable file, every file is readable, every ``.parquet`` file has a ``text`` column of
    strings, every ``.json`` file is a list of objects with ``text``, and the first record of
    every ``.jsonl`` file has ``text``. Raises :class:`DataError` otherwise.
    """
    if not paths:
        raise DataError(f"no data given; pass --data PATH ({_FORMATS_HINT})")
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"data path {path} does not exist; check the --data argument")
        if path.is_dir():
            candidates = _folder_files(path)
            if not candidates:
                raise DataError(
                    f"folder {path} holds no usable data files (hidden and binary files are "
                    f"skipped); {_FORMATS_HINT}"
                )
        elif path.is_file():
            _check_file(path, explicit=True)
            candidates = [path]
        else:
            raise DataError(f"data path {path} is neither a regular file nor a folder")
        for file in candidates:
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                found.append(file)
    logger.info("found %d data file(s) under %d path(s)", len(found), len(paths))
    return found


def _folder_files(root: Path) -> list[Path]:
    """Usable files under ``root``, sorted by relative POSIX path."""
    found: list[tuple[str, Path]] = []
    # os.walk with followlinks=False: a symlinked folder cannot make the walk loop forever.
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            file = Path(dirpath) / name
            if not file.is_file():
                continue
            if _check_file(file, explicit=False):
                found.append((file.relative_to(root).as_posix(), file))
            else:
                logger.debug("skipping binary file %s", file)
    return [file for _, file in sorted(found)]


def _raise_walk_error(err: OSError) -> None:
    raise DataError(
        f"cannot list folder {err.filename}: {err.strerror}; check its permissions"
    ) from err


def _check_file(path: Path, *, explicit: bool) -> bool:
    """Validate one file; False when a folder member should be skipped (binary)."""
    suffix = path.suffix.lower()
    try:
        if suffix == _PARQUET_SUFFIX:
            _check_parquet(path)
        elif suffix == _JSON_SUFFIX:
            _json_texts(path)  # parses the whole file: a .json file cannot be streamed
        elif suffix in _JSONL_SUFFIXES:
            with closing(_jsonl_texts(path, first_only=True)) as first:
                next(first, None)
        else:
            with open(path, "rb") as f:
                head = f.read(_SNIFF_BYTES)
            if b"\0" in head:
                if explicit:
                    # NOTE: "any extension is plain text", but a NUL byte means a binary
                    # file (an archive, a model, compressed data) given by mistake.
                    raise DataError(f"{path} looks binary (it holds NUL bytes); {_FORMATS_HINT}")
                return False
    except PermissionError as err:
        raise DataError(
            f"cannot read {path}: permission denied; make it readable by this user "
            "(chmod u+r) or leave it out of --data"
        ) from err
    except OSError as err:
        raise DataError(f"cannot read {path}: {err.strerror or err}") from err
    return True


def _check_parquet(path: Path) -> None:
    try:
        schema = pq.read_schema(path)
    except pa.ArrowInvalid as err:  # OSErrors (permissions) go to the caller's handler
        raise DataError(f"{path} is not a valid Parquet file: {err}") from err
    if TEXT_FIELD not in schema.names:
        raise DataError(
            f"{path} has no '{TEXT_FIELD}' column (columns: {', '.join(schema.names) or 'none'}); "
            f"rename the column that holds the documents to '{TEXT_FIELD}'"
        )
    kind = schema.field(TEXT_FIELD).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
        raise DataError(
            f"{path}: column '{TEXT_FIELD}' is of type {kind}, not string; store the documents "
            "as strings"
        )


# --- the data commitment -------------------------------------------------------------------


def data_commitment(
    files: Sequence[Path], root: Path | str | None = None
) -> tuple[str, dict[str, Any]]:
    """The owner's commitment to its training data: ``(digest, manifest)``.

    The manifest lists each file's path relative to ``root`` (default: the deepest folder
    holding all the files), its SHA-256 and size, sorted by path; the digest is the hex
    SHA-256 of the manifest's canonical JSON (sorted keys, no spaces). It depends only on
    file contents and relative paths, not on where the data lives, timestamps or permissions.
    The data never leaves; the manifest lets the owner prove later which data it was.
    """
    if not files:
        raise DataError("cannot commit to an empty list of data files")
    # abspath, not resolve(): a symlink in the data folder must not turn the paths into
    # wherever its target lives, which would tie the commitment to one machine's layout.
    resolved = [Path(os.path.abspath(f)) for f in files]
    base = Path(os.path.abspath(root)) if root is not None else _common_root(resolved)
    entries: dict[str, dict[str, Any]] = {}
    for file in resolved:
        try:
            rel = file.relative_to(base).as_posix()
        except ValueError as err:
            raise DataError(f"data file {file} is not under the commitment root {base}") from err
        try:
            entries[rel] = {"path": rel, "sha256": sha256_file(file), "size": file.stat().st_size}
        except OSError as err:
            raise DataError(f"cannot read {file} to hash it: {err.strerror or err}") from err
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "files": [entries[rel] for rel in sorted(entries)],
    }
    return _canonical_digest(manifest), manifest


def _common_root(files: Sequence[Path]) -> Path:
    return Path(os.path.commonpath([str(f.parent) for f in files]))


def _canonical_digest(manifest: dict[str, Any]) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --- reading documents ---------------------------------------------------------------------


def read_documents(files: Sequence[Path]) -> Iterator[str]:
    """Yield the documents in ``files``, in order, skipping empty (whitespace-only) ones.

    A plain-text file is one document, except that a file longer than
    :data:`MAX_DOCUMENT_CHARS` characters is split at blank lines (at line ends if a
    paragraph is longer still) into documents of at most about that size. Each ``.jsonl`` /
    ``.json`` record and each ``.parquet`` row is one document. Text is decoded as UTF-8 with
    invalid bytes replaced (a leading byte-order mark is dropped). A malformed record raises
    :class:`DataError` naming the file (and the line, for ``.jsonl``).
    """
    for file in files:
        path = Path(file)
        suffix = path.suffix.lower()
        try:
            if suffix == _PARQUET_SUFFIX:
                texts = _parquet_texts(path)
            elif suffix == _JSON_SUFFIX:
                texts = iter(_json_texts(path))
            elif suffix in _JSONL_SUFFIXES:
                texts = _jsonl_texts(path)
            else:
                texts = _plain_text_documents(path)
            for text in texts:
                if text.strip():
                    yield text
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror or err}") from err


def _plain_text_documents(path: Path) -> Iterator[str]:
    """One document per file, or blank-line-aligned chunks of a very large file."""
    chunk: list[str] = []
    chunk_len = 0
    para: list[str] = []
    para_len = 0

    def flush_para() -> Iterator[str]:
        nonlocal chunk, chunk_len, para, para_len
        if chunk and chunk_len + para_len > MAX_DOCUMENT_CHARS:
            yield "".join(chunk)
            chunk, chunk_len = [], 0
        chunk += para
        chunk_len += para_len
        para, para_len = [], 0

    # utf-8-sig: plain UTF-8 that also drops a byte-order mark, which would otherwise become
    # a junk token at the start of the document.
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        # readline(limit) caps a single enormous line (minified files) at the chunk size.
        for line in iter(lambda: f.readline(MAX_DOCUMENT_CHARS), ""):
            if para and para_len + len(line) > MAX_DOCUMENT_CHARS:
                # A paragraph longer than a document: cut it at a line end.
                yield from flush_para()
            para.append(line)
            para_len += len(line)
            if not line.strip():  # a blank line closes the paragraph it follows
                yield from flush_para()
        yield from flush_para()
    if chunk:
        yield "".join(chunk)


def _record_text(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(
            f"{where}: expected a JSON object with a '{TEXT_FIELD}' field, "
            f"got {type(record).__name__}"
        )
    if TEXT_FIELD not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise DataError(
            f"{where}: record has no '{TEXT_FIELD}' field (fields: {keys}); "
            f"put each document's text under '{TEXT_FIELD}'"
        )
    text = record[TEXT_FIELD]
    if text is None:
        return ""  # a null text is an empty document, as a null in a Parquet column is
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{TEXT_FIELD}' is a {type(text).__name__}, not a string")
    return text


def _jsonl_texts(path: Path, first_only: bool = False) -> Generator[str, None, None]:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{where}: not valid JSON ({err.msg}, column {err.colno}); each line of a "
                    f".jsonl file must be one JSON object with a '{TEXT_FIELD}' field"
                ) from err
            yield _record_text(record, where)
            if first_only:
                return


def _json_texts(path: Path) -> list[str]:
    """Texts of a .json file: a list of objects with ``text`` (or one such object)."""
    raw = path.read_bytes().decode("utf-8-sig", errors="replace")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":
            # Many datasets ship JSON Lines under a .json name; read them as such.
            return list(_jsonl_texts(path))
        raise DataError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}); a .json data file must hold a "
            f"list of objects with a '{TEXT_FIELD}' field"
        ) from err
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a list of objects with a '{TEXT_FIELD}' field, "
            f"got a JSON {type(data).__name__}"
        )
    return [_record_text(rec, f"{path}: record {i}") for i, rec in enumerate(data)]


def _parquet_texts(path: Path) -> Iterator[str]:
    _check_parquet(path)
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[TEXT_FIELD]):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if isinstance(value, bytes):
                value = value.decode("utf-8", errors="replace")
            yield value


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
            f"training data ({_FORMATS_HINT})"
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
