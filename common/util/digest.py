"""Content digests: of files, and of directories in the OpenSSF model-signing way.

A directory's identity is the SHA-256 over the raw SHA-256 digests of its files, taken in the
order of their sorted relative POSIX paths: the "files" serialization of model-signing, whose
root digest is exactly this. The signature file itself and git metadata are not part of it.
Symbolic links are refused: a digest must describe bytes that are really in the directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from flexfed.common.errors import InvalidInputError, MissingFileError

SIGNATURE_FILE = "model.sig"
_IGNORED_NAMES = frozenset({SIGNATURE_FILE, ".git", ".gitattributes", ".github", ".gitignore"})
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    with open(path, "rb") as f:
        return sha256_stream(f)[0]


def sha256_stream(f: BinaryIO) -> tuple[str, int]:
    """Hex SHA-256 and length of everything left in the binary file ``f`` (1 MiB reads)."""
    h = hashlib.sha256()
    n = 0
    while chunk := f.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_files(root: Path, ignore: frozenset[str] = _IGNORED_NAMES) -> Iterator[tuple[str, Path]]:
    """Yield (relative POSIX path, absolute path) of every regular file, sorted by path."""
    if not root.is_dir():
        raise MissingFileError(f"{root} is not a directory")
    found: list[tuple[str, Path]] = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] in _IGNORED_NAMES or path.name in ignore:
            continue
        if path.is_symlink():
            raise InvalidInputError(f"{path} is a symbolic link; artifacts must hold plain files")
        if path.is_file():
            found.append((rel.as_posix(), path))
    yield from sorted(found)


def file_manifest(root: Path) -> dict[str, str]:
    """Map each file's relative path to its hex SHA-256."""
    return {rel: sha256_file(path) for rel, path in iter_files(root)}


def manifest_digest(manifest: dict[str, str]) -> str:
    """Root digest of a manifest: SHA-256 over the raw file digests in sorted path order."""
    h = hashlib.sha256()
    for rel in sorted(manifest):
        h.update(bytes.fromhex(manifest[rel]))
    return h.hexdigest()


def directory_digest(root: Path) -> str:
    """The model-signing "files" root digest of a directory (hex, no prefix)."""
    return manifest_digest(file_manifest(root))
