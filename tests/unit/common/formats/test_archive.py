"""The artifact tar stream: deterministic packing, and extraction that refuses anything unsafe."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from flexfed.common.errors import InvalidInputError
from flexfed.common.formats.archive import (
    DestinationExistsError,
    MalformedDigestError,
    UnsafeArchiveError,
    extract_archive,
    format_digest,
    pack_directory,
    parse_digest,
)
from flexfed.common.util.digest import sha256_file


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "config.json").write_text('{"a": 1}\n')
    (root / "weights.bin").write_bytes(os.urandom(300_000))
    (root / "empty.txt").write_bytes(b"")
    (root / "sub" / "deeper" / "x.txt").write_text("deep\n")
    (root / "sub" / ("n" * 150 + ".txt")).write_text("a name longer than USTAR holds\n")
    (root / "sub" / "ünïcode.md").write_text("utf-8 names\n")
    return root


def tree_of(root: Path) -> dict[str, bytes | None]:
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = None if path.is_dir() else path.read_bytes()
    return out


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A tar archive built by hand, for the archives a hostile client could send."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


# --- packing -------------------------------------------------------------------------------


def test_packing_is_deterministic_across_runs_times_and_modes(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    first = pack_directory(src, tmp_path / "a.tar")
    second = pack_directory(src, tmp_path / "b.tar")
    assert first.digest == second.digest
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    for path in src.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    os.chmod(src / "config.json", 0o600)
    third = pack_directory(src, tmp_path / "c.tar")
    assert third.digest == first.digest
    assert third.size == (tmp_path / "c.tar").stat().st_size
    assert third.digest == format_digest(sha256_file(tmp_path / "c.tar"))


def test_packed_entries_are_sorted_and_normalised(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    packed = pack_directory(src, tmp_path / "a.tar")
    with tarfile.open(packed.path) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname) == (0, 0, 0, "", "")
        assert m.mode == (0o755 if m.isdir() else 0o644)
        assert m.isdir() or m.isreg()


def test_a_content_change_changes_the_digest(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    before = pack_directory(src, tmp_path / "a.tar").digest
    (src / "config.json").write_text('{"a": 2}\n')
    assert pack_directory(src, tmp_path / "b.tar").digest != before


def test_pack_refuses_symlinks_and_an_existing_output(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    (tmp_path / "out.tar").write_bytes(b"keep me")
    with pytest.raises(DestinationExistsError):
        pack_directory(src, tmp_path / "out.tar")
    assert (tmp_path / "out.tar").read_bytes() == b"keep me"
    (src / "link").symlink_to(src / "config.json")
    with pytest.raises(InvalidInputError, match="symbolic link"):
        pack_directory(src, tmp_path / "b.tar")
    assert not (tmp_path / "b.tar").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_round_trip_gives_the_same_tree_and_repacks_to_the_same_digest(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    packed = pack_directory(src, tmp_path / "a.tar")
    out = extract_archive(packed.path, tmp_path / "out" / "model")
    assert tree_of(out) == tree_of(src)
    assert pack_directory(out, tmp_path / "again.tar").digest == packed.digest


def test_digest_strings_are_checked() -> None:
    good = "sha256:" + "ab" * 32
    assert parse_digest(good) == "ab" * 32
    for bad in ["ab" * 32, "sha256:" + "AB" * 32, "sha256:" + "ab" * 31, "sha512:" + "ab" * 32]:
        with pytest.raises(MalformedDigestError):
            parse_digest(bad)


# --- extraction refusals -------------------------------------------------------------------


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = member(name, kind)
    info.linkname = target
    return info


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([(link("evil", "/etc/passwd", tarfile.SYMTYPE), None)], "link or special"),
        ([(member("a.txt"), b"x"), (link("b", "a.txt", tarfile.LNKTYPE), None)], "link"),
        ([(member("dev", tarfile.CHRTYPE), None)], "special"),
        ([(member("blk", tarfile.BLKTYPE), None)], "special"),
        ([(member("fifo", tarfile.FIFOTYPE), None)], "special"),
        ([(member("/etc/cron.d/x"), b"x")], "absolute"),
        ([(member("../escape.txt"), b"x")], r"'\.\.'"),
        ([(member("a/../../escape.txt"), b"x")], r"'\.\.'"),
        ([(member("./a//b"), b"x")], "empty"),
        ([(member("a.txt"), b"x"), (member("a.txt"), b"y")], "twice"),
        ([(member("d", tarfile.DIRTYPE), None), (member("d/"), b"y")], "twice"),
        ([(member("f"), b"x"), (member("f/inner"), b"y")], "below a file"),
    ],
    ids=[
        "symlink",
        "hardlink",
        "chardev",
        "blockdev",
        "fifo",
        "absolute",
        "dotdot",
        "dotdot-inner",
        "dot-and-empty",
        "duplicate",
        "dir-then-file",
        "file-as-parent",
    ],
)
def test_extraction_refuses_unsafe_members(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], reason: str
) -> None:
    archive = write_tar(tmp_path / "bad.tar", members)
    with pytest.raises(UnsafeArchiveError, match=reason):
        extract_archive(archive, tmp_path / "out")
    assert_nothing_left(tmp_path)


def assert_nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    assert not (tmp_path.parent / "escape.txt").exists()


def test_extraction_refuses_content_over_the_limit(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    packed = pack_directory(src, tmp_path / "a.tar")
    content = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    with pytest.raises(UnsafeArchiveError, match="exceeds the limit"):
        extract_archive(packed.path, tmp_path / "out", max_bytes=content - 1)
    assert_nothing_left(tmp_path)
    assert extract_archive(packed.path, tmp_path / "out", max_bytes=content).is_dir()


@pytest.mark.parametrize("cut", ["mid-data", "mid-header", "no-end-marker", "half-block"])
def test_extraction_refuses_a_truncated_archive(tmp_path: Path, cut: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(5000))
    (src / "b.bin").write_bytes(os.urandom(5000))
    data = pack_directory(src, tmp_path / "a.tar").path.read_bytes()
    b_header = 512 + 10 * 512  # a.bin's header and its 5000 bytes padded to blocks
    keep = {
        "mid-data": 512 + 2000,
        "mid-header": b_header + 100,
        "no-end-marker": b_header + 512 + 10 * 512,
        "half-block": b_header + 512 + 10 * 512 + 700,
    }[cut]
    (tmp_path / "cut.tar").write_bytes(data[:keep])
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tmp_path / "cut.tar", tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_extraction_refuses_a_corrupt_header_and_trailing_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(1000))
    (src / "b.bin").write_bytes(os.urandom(1000))
    data = bytearray(pack_directory(src, tmp_path / "a.tar").path.read_bytes())
    corrupt = bytearray(data)
    corrupt[512 + 1024 + 10] ^= 0xFF  # b.bin's header: its checksum no longer matches
    (tmp_path / "corrupt.tar").write_bytes(corrupt)
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tmp_path / "corrupt.tar", tmp_path / "out")
    (tmp_path / "trailing.tar").write_bytes(bytes(data) + b"appended garbage")
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tmp_path / "trailing.tar", tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(os.urandom(4096))
    with pytest.raises(UnsafeArchiveError):
        extract_archive(tmp_path / "junk.tar", tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_extraction_never_replaces_an_existing_destination(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    packed = pack_directory(src, tmp_path / "a.tar")
    (tmp_path / "out").mkdir()  # even an empty directory is kept as it is
    with pytest.raises(DestinationExistsError):
        extract_archive(packed.path, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_extracted_modes_ignore_the_archive(tmp_path: Path) -> None:
    info = member("run.sh")
    info.mode = 0o4777  # setuid, world-writable: never reproduced
    archive = write_tar(tmp_path / "modes.tar", [(info, b"#!/bin/sh\n")])
    out = extract_archive(archive, tmp_path / "out")
    assert (out / "run.sh").stat().st_mode & 0o7777 == 0o644
