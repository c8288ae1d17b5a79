"""Data ingestion: every input format, the data commitment, packing and the split, and the
errors a data owner gets for bad input (each must say what is wrong and where)."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from flexfed.common.data.documents import (
    MANIFEST_FORMAT,
    MAX_DOCUMENT_CHARS,
    data_commitment,
    find_data_files,
    read_documents,
)
from flexfed.common.data.packing import (
    PackedData,
    is_validation_document,
    load_training_data,
    pack_documents,
)
from flexfed.common.errors import ConfigError, DataError
from flexfed.common.public.tiny import byte_tokenizer

EOS = 256


@pytest.fixture(scope="module")
def tok() -> Any:
    return byte_tokenizer()


def write_parquet(path: Path, texts: list[str | None], column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def docs_of(*paths: Path | str) -> list[str]:
    return list(read_documents(find_data_files(paths)))


def stream(docs: list[str]) -> list[int]:
    """The token stream the byte tokenizer makes of documents: bytes, EOS after each."""
    return [t for d in docs for t in [*d.encode("utf-8"), EOS]]


def unpack(rows: torch.Tensor) -> list[str]:
    """Documents in packed rows (byte tokens, EOS-separated), partial ones included."""
    out: list[str] = []
    cur = bytearray()
    for t in rows.flatten().tolist():
        if t == EOS:
            out.append(cur.decode("utf-8", errors="replace"))
            cur = bytearray()
        else:
            cur.append(t)
    if cur:
        out.append(cur.decode("utf-8", errors="replace"))
    return out


# --- formats -------------------------------------------------------------------------------


def test_plain_text_file_is_one_document(tmp_path: Path) -> None:
    f = tmp_path / "notes.md"
    f.write_text("# Title\n\nfirst paragraph\n\nsecond paragraph\n", encoding="utf-8")
    assert docs_of(f) == ["# Title\n\nfirst paragraph\n\nsecond paragraph\n"]


def test_any_extension_is_plain_text_and_invalid_utf8_is_replaced(tmp_path: Path) -> None:
    f = tmp_path / "data.log"
    f.write_bytes(b"caf\xc3\xa9 \xff ok")
    assert docs_of(f) == ["café \ufffd ok"]


def test_large_text_file_is_split_at_blank_lines(tmp_path: Path) -> None:
    para = ("word " * 2000).strip() + "\n"  # ~10k characters
    text = "\n".join([para] * 30)  # ~300k characters, blank lines between paragraphs
    f = tmp_path / "big.txt"
    f.write_text(text, encoding="utf-8")
    docs = docs_of(f)
    assert len(docs) >= 3
    assert all(len(d) <= MAX_DOCUMENT_CHARS for d in docs)
    assert "".join(docs) == text  # nothing lost, nothing reordered
    assert all(d.endswith("\n\n") for d in docs[:-1])  # cut at blank lines only


def test_huge_line_without_blank_lines_is_still_split(tmp_path: Path) -> None:
    text = "x" * (MAX_DOCUMENT_CHARS * 2 + 10)
    f = tmp_path / "minified.js"
    f.write_text(text, encoding="utf-8")
    docs = docs_of(f)
    assert "".join(docs) == text
    assert all(len(d) <= MAX_DOCUMENT_CHARS for d in docs)


def test_jsonl_records_are_documents_and_empty_ones_skipped(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "alpha", "meta": 1}, {"text": ""}, {"text": None}, {"text": "beta"}],
    )
    with open(f, "a", encoding="utf-8") as out:
        out.write("\n   \n")  # blank lines are allowed
    assert docs_of(f) == ["alpha", "beta"]


def test_json_list_of_objects(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "one"}, {"text": "two", "x": [1]}]), encoding="utf-8")
    assert docs_of(f) == ["one", "two"]


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.json", [{"text": "one"}, {"text": "two"}])
    assert docs_of(f) == ["one", "two"]


def test_parquet_rows_are_documents(tmp_path: Path) -> None:
    f = write_parquet(tmp_path / "d.parquet", ["first row", None, "", "third row"])
    assert docs_of(f) == ["first row", "third row"]


def test_folder_mixing_formats_recursive_sorted_hidden_and_binary_skipped(
    tmp_path: Path,
) -> None:
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.txt").write_text("from b.txt", encoding="utf-8")
    write_jsonl(root / "a.jsonl", [{"text": "from a.jsonl"}])
    (root / "sub" / "c.json").write_text(json.dumps([{"text": "from c.json"}]), encoding="utf-8")
    write_parquet(root / "sub" / "deeper" / "d.parquet", ["from d.parquet"])
    (root / "sub" / "e.py").write_text("print('from e.py')\n", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    (root / ".git" / "config").write_text("hidden too", encoding="utf-8")
    (root / "model.bin").write_bytes(b"\x00\x01\x02binary")

    files = find_data_files([root])
    assert [f.relative_to(root).as_posix() for f in files] == [
        "a.jsonl",
        "b.txt",
        "sub/c.json",
        "sub/deeper/d.parquet",
        "sub/e.py",
    ]
    assert list(read_documents(files)) == [
        "from a.jsonl",
        "from b.txt",
        "from c.json",
        "from d.parquet",
        "print('from e.py')\n",
    ]


def test_paths_keep_argument_order_and_duplicates_are_dropped(tmp_path: Path) -> None:
    (tmp_path / "z.txt").write_text("z", encoding="utf-8")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a", encoding="utf-8")
    files = find_data_files([tmp_path / "z.txt", str(tmp_path / "d"), tmp_path / "d" / "a.txt"])
    assert files == [tmp_path / "z.txt", tmp_path / "d" / "a.txt"]


# --- errors --------------------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        find_data_files([tmp_path / "nope.txt"])


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="no usable data files"):
        find_data_files([tmp_path / "empty"])


def test_folder_of_only_binary_or_hidden_files(tmp_path: Path) -> None:
    (tmp_path / "blob.bin").write_bytes(b"\x00" * 10)
    (tmp_path / ".secret").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="no usable data files"):
        find_data_files([tmp_path])


def test_explicit_binary_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "data.gz"
    f.write_bytes(b"\x1f\x8b\x00\x00")
    with pytest.raises(DataError, match="looks binary"):
        find_data_files([f])


def test_empty_files_only(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n\n  \n", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": ""}])
    with pytest.raises(DataError, match="found no text"):
        load_training_data([tmp_path], tok, seq_len=8)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file"
)
def test_unreadable_file_chmod(tmp_path: Path) -> None:
    f = tmp_path / "secret.txt"
    f.write_text("text", encoding="utf-8")
    f.chmod(0)
    try:
        with pytest.raises(DataError, match="permission denied"):
            find_data_files([tmp_path])
    finally:
        f.chmod(0o600)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same path as the chmod test, also under root: opening the file is denied.
    f = tmp_path / "secret.txt"
    f.write_text("text", encoding="utf-8")
    real_open = builtins.open

    def deny(file: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(str(file)) == f:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(DataError, match=r"secret\.txt: permission denied"):
        find_data_files([tmp_path])


def test_parquet_without_text_column(tmp_path: Path) -> None:
    f = write_parquet(tmp_path / "d.parquet", ["a"], column="content")
    with pytest.raises(DataError, match=r"no 'text' column \(columns: content, id\)"):
        find_data_files([f])


def test_parquet_text_column_not_strings(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), f)
    with pytest.raises(DataError, match="not string"):
        find_data_files([f])


def test_not_a_parquet_file(tmp_path: Path) -> None:
    f = tmp_path / "d.parquet"
    f.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid Parquet file"):
        find_data_files([f])


def test_json_without_text_field(tmp_path: Path) -> None:
    f = tmp_path / "d.json"
    f.write_text(json.dumps([{"text": "ok"}, {"body": "no"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"record 1: record has no 'text' field \(fields: body\)"):
        find_data_files([f])


def test_jsonl_bad_line_reports_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": broken}\n', encoding="utf-8")
    files = find_data_files([f])  # only the first record is checked up front
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        list(read_documents(files))


def test_jsonl_first_record_without_text_fails_early(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"content": "x"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: record has no 'text' field"):
        find_data_files([f])


def test_too_little_text_for_one_sequence(tmp_path: Path, tok: Any) -> None:
    (tmp_path / "a.txt").write_text("tiny", encoding="utf-8")
    with pytest.raises(DataError, match=r"found 5 tokens .* need at least 64.*--seq-len"):
        load_training_data([tmp_path / "a.txt"], tok, seq_len=64)


def test_data_errors_are_value_errors_with_an_exit_code(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        find_data_files([tmp_path / "nope"])
    assert isinstance(info.value, DataError) and info.value.exit_code == 3


# --- commitment ----------------------------------------------------------------------------


def make_corpus(root: Path) -> list[Path]:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha", encoding="utf-8")
    write_jsonl(root / "sub" / "b.jsonl", [{"text": "beta"}])
    write_parquet(root / "sub" / "c.parquet", ["gamma"])
    return find_data_files([root])


def test_commitment_manifest_format(tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "corpus")
    digest, manifest = data_commitment(files)
    assert manifest["format"] == MANIFEST_FORMAT
    assert [e["path"] for e in manifest["files"]] == ["a.txt", "sub/b.jsonl", "sub/c.parquet"]
    first = manifest["files"][0]
    assert first["size"] == 5
    assert len(first["sha256"]) == 64
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    assert digest == hashlib.sha256(canonical).hexdigest()


def test_commitment_is_stable_and_independent_of_location_mtime_and_order(
    tmp_path: Path,
) -> None:
    files = make_corpus(tmp_path / "one")
    digest, _ = data_commitment(files)
    assert data_commitment(files)[0] == digest
    assert data_commitment(list(reversed(files)))[0] == digest
    for f in files:
        os.utime(f, (1_000_000, 1_000_000))
    assert data_commitment(files)[0] == digest
    # The same data elsewhere on disk commits the same.
    assert data_commitment(make_corpus(tmp_path / "elsewhere" / "two"))[0] == digest


def test_commitment_changes_when_one_byte_changes(tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "corpus")
    digest, _ = data_commitment(files)
    stat = files[0].stat()
    files[0].write_text("alphA", encoding="utf-8")  # same size
    os.utime(files[0], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data_commitment(files)[0] != digest


def test_commitment_with_explicit_root(tmp_path: Path) -> None:
    files = make_corpus(tmp_path / "corpus")
    _, manifest = data_commitment(files, root=tmp_path)
    assert manifest["files"][0]["path"] == "corpus/a.txt"


# --- packing -------------------------------------------------------------------------------


def corpus(n: int = 200) -> list[str]:
    return [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(n)]


def test_packing_shapes_dtype_and_counts(tok: Any) -> None:
    docs = corpus()
    packed = pack_documents(docs, tok, seq_len=32, val_fraction=0.1)
    assert isinstance(packed, PackedData)
    assert packed.train.dtype == packed.val.dtype == torch.int64
    assert packed.train.shape[1] == packed.val.shape[1] == packed.seq_len == 32
    assert packed.val.shape[0] >= 1
    assert packed.num_documents == len(docs)
    assert packed.num_tokens == (packed.train.shape[0] + packed.val.shape[0]) * 32
    total = sum(len(d.encode()) + 1 for d in docs)
    assert total - 2 * 32 < packed.num_tokens <= total  # only the two ragged tails dropped


def test_documents_are_followed_by_eos(tok: Any) -> None:
    packed = pack_documents(["abc", "de", "fgh"] * 4, tok, seq_len=4, val_fraction=0.0)
    flat = packed.train.flatten().tolist()
    assert flat[:8] == [97, 98, 99, EOS, 100, 101, EOS, 102]
    assert packed.val.shape == (0, 4)  # val_fraction 0: no validation at all


def test_split_is_deterministic_and_document_disjoint(tok: Any) -> None:
    docs = corpus(400)
    a = pack_documents(docs, tok, seq_len=16, val_fraction=0.2)
    b = pack_documents(iter(docs), tok, seq_len=16, val_fraction=0.2)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)

    val_docs = [d for d in docs if is_validation_document(d, 0.2)]
    train_docs = [d for d in docs if not is_validation_document(d, 0.2)]
    assert 0 < len(val_docs) < len(docs)
    # Each split is exactly its own documents' stream, cut into rows: no token of a
    # validation document is in train, and the reverse.
    assert a.train.flatten().tolist() == stream(train_docs)[: a.train.numel()]
    assert a.val.flatten().tolist() == stream(val_docs)[: a.val.numel()]
    assert len(stream(val_docs)) - a.val.numel() < 16  # only the ragged tail is dropped


def test_split_does_not_depend_on_document_order(tok: Any) -> None:
    docs = corpus(300)
    forward = pack_documents(docs, tok, seq_len=16, val_fraction=0.3)
    backward = pack_documents(docs[::-1], tok, seq_len=16, val_fraction=0.3)
    expected = {d for d in docs if is_validation_document(d, 0.3)}
    assert len(expected) > 10
    for packed in (forward, backward):
        # The same documents are in validation, up to one cut by the ragged tail.
        whole = {d for d in unpack(packed.val) if d in expected}
        assert len(expected - whole) <= 1
        assert not set(unpack(packed.train)) & expected


def test_fallback_carves_whole_documents_for_validation(tok: Any) -> None:
    # Find documents that all hash to train, so the validation stream is empty.
    docs = [d for d in corpus(100) if not is_validation_document(d, 0.05)][:20]
    packed = pack_documents(docs, tok, seq_len=16, val_fraction=0.05)
    assert packed.val.shape[0] >= 1 and packed.train.shape[0] >= 1
    # Train is a prefix of the documents, validation the rest, cut at a document start.
    train_stream = packed.train.flatten().tolist()
    full = stream(docs)
    cut = next(i for i in range(len(docs)) if len(stream(docs[:i])) >= len(train_stream))
    assert train_stream == full[: len(train_stream)]
    assert packed.val.flatten().tolist() == stream(docs[cut:])[: packed.val.numel()]


def test_fallback_last_sequence_when_one_document(tok: Any) -> None:
    packed = pack_documents(["x" * 100], tok, seq_len=10, val_fraction=0.05)
    if is_validation_document("x" * 100, 0.05):  # pragma: no cover - depends on the hash
        pytest.skip("the document hashed to validation")
    assert packed.train.shape == (9, 10)
    assert packed.val.shape == (1, 10)


def test_only_one_sequence_of_text_keeps_it_for_training(tok: Any) -> None:
    packed = pack_documents(["abcdefghi"], tok, seq_len=10, val_fraction=0.5)
    assert packed.train.shape == (1, 10)
    assert packed.val.shape == (0, 10)


def test_all_documents_in_validation_go_to_train(tok: Any) -> None:
    docs = [d for d in corpus(200) if is_validation_document(d, 0.05)]
    assert docs
    packed = pack_documents(docs, tok, seq_len=8, val_fraction=0.05)
    assert packed.train.shape[0] >= 1


def test_max_tokens_is_respected(tok: Any) -> None:
    docs = corpus(500)
    packed = pack_documents(docs, tok, seq_len=32, max_tokens=1000)
    assert packed.num_tokens <= 1000
    assert packed.num_tokens > 1000 - 2 * 32
    assert packed.num_documents < len(docs)
    # A budget is a prefix: more budget never changes what came first.
    small = pack_documents(docs, tok, seq_len=32, max_tokens=3000)
    assert torch.equal(small.train[: packed.train.shape[0] - 1], packed.train[:-1])


def test_progress_callback(tok: Any) -> None:
    calls: list[tuple[int, int]] = []
    pack_documents(corpus(50), tok, seq_len=8, progress=lambda d, t: calls.append((d, t)))
    assert calls and calls[-1][0] == 50


@pytest.mark.parametrize(
    "kwargs",
    [{"seq_len": 1}, {"val_fraction": 1.0}, {"val_fraction": -0.1}, {"max_tokens": 0}],
)
def test_bad_settings(tok: Any, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"seq_len": 8} | kwargs
    with pytest.raises(ConfigError):
        pack_documents(["some text"], tok, **args)


# --- the whole call ------------------------------------------------------------------------


def test_load_training_data(tmp_path: Path, tok: Any) -> None:
    files = make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "more.txt").write_text("delta " * 200, encoding="utf-8")
    packed, digest, manifest = load_training_data(
        [tmp_path / "corpus"], tok, seq_len=16, val_fraction=0.05
    )
    assert (digest, manifest) == data_commitment(find_data_files([tmp_path / "corpus"]))
    assert len(manifest["files"]) == len(files) + 1
    assert packed.num_documents == 4
    assert packed.train.shape[0] >= 1
    assert packed.val.shape[0] >= 1
