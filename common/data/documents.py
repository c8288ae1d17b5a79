"""An owner's data: find it, commit to it, read it as documents. The data never leaves the owner.

What leaves is :func:`data_commitment`: the SHA-256 of a manifest of the files trained on
(relative path, SHA-256, size), so the owner can later prove which data an expert was trained
on without showing it.

Accepted inputs (``--data``): plain-text files (any extension), ``.jsonl`` / ``.json`` files
whose records carry a ``text`` field, ``.parquet`` files with a ``text`` column, or folders of
those (recursive, sorted, hidden entries skipped, binary files skipped). What a *document* is:
one record of a JSON Lines, JSON or Parquet file; for a plain-text file, the whole file, split
at blank lines into pieces of at most :data:`MAX_DOCUMENT_CHARS` characters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flexfed.common.errors import DataError
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
FORMATS_HINT = (
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
        raise DataError(f"no data given; pass --data PATH ({FORMATS_HINT})")
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
                    f"skipped); {FORMATS_HINT}"
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
                    raise DataError(f"{path} looks binary (it holds NUL bytes); {FORMATS_HINT}")
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
