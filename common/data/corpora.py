"""Offline text domains for the demo and the evaluation: nothing is downloaded.

Every source is on any machine that runs flexfed (CPython's own files, Debian's base files) or
is generated here. Each domain is written as JSON Lines of ~2,000-character documents, so the
held-out split (by document) has fine grain. Licenses are listed in docs/data-sources.md.

| domain | source                                                   | license                 |
|--------|----------------------------------------------------------|-------------------------|
| public | CPython's language reference (``pydoc_data.topics``)     | PSF-2.0                 |
| code   | CPython's standard-library source (top-level ``*.py``)   | PSF-2.0                 |
| math   | arithmetic and linear equations, :func:`math_documents`  | Apache-2.0 (ours)       |
| legal  | license texts in ``/usr/share/common-licenses`` (Debian) | verbatim copying (each) |
| changelog | Debian changelogs, ``/usr/share/doc/*/changelog.Debian.gz`` | each package's  |
| manuals | section-1 manual pages (roff), ``/usr/share/man/man1``          | each package's  |

Sizes: the language reference is ~465,000 characters and the license texts, each once, only
~237,000 (124 documents), so ``public_chars`` and ``corpus_chars`` above those are not
reached; the other sources are larger than any preset asks (the standard library ~4.2 MB,
math unbounded; ~19 MB of changelogs and ~11 MB of manual pages on the development
machine). The default demo preset's 2,000,000 characters per closed domain therefore
give legal about an eighth of the text of code and math.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

from flexfed.common.errors import DataError

log = logging.getLogger(__name__)

DOC_CHARS = 2000
LICENSES_DIR = Path("/usr/share/common-licenses")
DOC_DIR = Path("/usr/share/doc")
MAN1_DIR = Path("/usr/share/man/man1")
# Cloud SDK command references: ~16,000 generated pages on machines that have the SDK; they
# would swamp the hand-written manuals and make the domain depend on one optional package.
MAN_SKIP_PREFIXES = ("gcloud", "bq", "gsutil")


def _chunks(text: str, size: int = DOC_CHARS) -> Iterator[str]:
    """Cut text into ~size-character documents at line boundaries."""
    buf: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        n += len(line)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf and "".join(buf).strip():
        yield "".join(buf)


def public_documents(max_chars: int) -> Iterator[str]:
    from pydoc_data.topics import topics  # the language reference, shipped with CPython

    yield from _take((c for key in sorted(topics) for c in _chunks(topics[key])), max_chars)


def code_documents(max_chars: int) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if not p.name.startswith("_"))
    texts = (c for f in files for c in _chunks(f.read_text(encoding="utf-8", errors="replace")))
    yield from _take(texts, max_chars)


def math_documents(max_chars: int, seed: int = 0) -> Iterator[str]:
    """Generated arithmetic and linear equations with worked answers."""
    rng = random.Random(seed)

    def problem() -> str:
        kind = rng.randrange(4)
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 20)
        if kind == 0:
            return f"Compute {a} + {b}. Answer: {a + b}."
        if kind == 1:
            return f"Compute {a} * {c}. Answer: {a * c}."
        if kind == 2:
            x = rng.randint(-20, 20)
            return f"Solve {c}*x + {a} = {c * x + a} for x. Answer: x = {x}."
        return f"What is {a} - {b}? Answer: {a - b}."

    def docs() -> Iterator[str]:
        while True:
            yield "\n".join(problem() for _ in range(40)) + "\n"

    yield from _take(docs(), max_chars)


def legal_documents(max_chars: int) -> Iterator[str]:
    """The license texts, each once (about 240,000 characters in all on Debian 12/13)."""
    if not LICENSES_DIR.is_dir():
        raise DataError(
            f"{LICENSES_DIR} is missing (Debian's base-files); the legal domain needs it"
        )
    # NOTE: GPL, LGPL and GFDL are symlinks to the current version (GPL -> GPL-3); reading them
    # too would put each of those texts in the corpus twice, and a held-out chunk's twin in
    # the training split.
    seen: set[bytes] = set()
    texts: list[str] = []
    for path in sorted(LICENSES_DIR.iterdir()):
        if not path.is_file() or path.is_symlink():
            continue
        raw = path.read_bytes()
        if raw in seen:
            continue
        seen.add(raw)
        texts.append(raw.decode("utf-8", errors="replace"))
    yield from _take((c for t in texts for c in _chunks(t)), max_chars)


def _distinct_texts(paths: list[Path], read: Callable[[Path], bytes]) -> Iterator[str]:
    """Each distinct file's text once (packages share changelogs and manual pages)."""
    seen: set[bytes] = set()
    for path in paths:
        try:
            raw = read(path)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            log.warning("skipping %s: %s", path, err)
            continue
        digest = hashlib.sha256(raw).digest()
        if digest in seen:
            continue
        seen.add(digest)
        yield raw.decode("utf-8", errors="replace")


def _gunzip(path: Path) -> bytes:
    with gzip.open(path) as f:
        return f.read()


def changelog_documents(max_chars: int) -> Iterator[str]:
    """Debian package changelogs: release notes with maintainers' names and dates."""
    paths = sorted(p for p in DOC_DIR.glob("*/changelog.Debian.gz") if p.is_file())
    if not paths:
        raise DataError(
            f"no {DOC_DIR}/*/changelog.Debian.gz found; the changelog domain needs a Debian system"
        )
    yield from _take((c for t in _distinct_texts(paths, _gunzip) for c in _chunks(t)), max_chars)


def manual_documents(max_chars: int) -> Iterator[str]:
    """Section-1 manual pages in their roff source (``.TH``, ``.SH``, ``\\fB`` ...)."""
    paths = sorted(
        p
        for p in MAN1_DIR.glob("*.gz")
        if p.is_file() and not p.is_symlink() and not p.name.startswith(MAN_SKIP_PREFIXES)
    )
    if not paths:
        raise DataError(f"no manual pages in {MAN1_DIR}; the manuals domain needs man-db's pages")
    # NOTE: a ".so other.1" page is a one-line redirect to another page, not text.
    texts = (t for t in _distinct_texts(paths, _gunzip) if not t.lstrip().startswith(".so "))
    yield from _take((c for t in texts for c in _chunks(_from_title(t))), max_chars)


def _from_title(page: str) -> str:
    """The page from its ``.TH`` line: generators (Pod::Man, help2man) put the same
    boilerplate macros before it, which would repeat across held-out and training documents."""
    at = page.find("\n.TH ")
    return page[at + 1 :] if at >= 0 else page


def _take(docs: Iterator[str], max_chars: int) -> Iterator[str]:
    total = 0
    for d in docs:
        if total >= max_chars:
            return
        yield d
        total += len(d)


SOURCES: dict[str, Callable[[int], Iterator[str]]] = {
    "public": public_documents,
    "code": code_documents,
    "math": math_documents,
    "legal": legal_documents,
    "changelog": changelog_documents,
    "manuals": manual_documents,
}
CLOSED_DOMAINS = ("code", "math", "legal", "changelog", "manuals")
LICENSES: dict[str, str] = {  # as in docs/data-sources.md
    "public": "PSF-2.0 (CPython's documentation)",
    "code": "PSF-2.0 (CPython's standard library)",
    "math": "Apache-2.0 (generated by flexfed)",
    "legal": "each license text permits verbatim copying",
    "changelog": "each package's license (/usr/share/doc/PACKAGE/copyright)",
    "manuals": "each package's license (/usr/share/doc/PACKAGE/copyright)",
}


def write_domain(name: str, out: Path, max_chars: int) -> Path:
    """Write one domain as JSON Lines (``{"text": ...}`` per document); return the file."""
    if name not in SOURCES:
        raise DataError(f"unknown domain {name!r}; known: {', '.join(SOURCES)}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for doc in SOURCES[name](max_chars):
            f.write(json.dumps({"text": doc}) + "\n")
    return path


def prepare(names: list[str], out: Path, max_chars: int) -> dict[str, dict[str, object]]:
    """Write each domain and ``MANIFEST.json`` (documents, characters, SHA-256, license)."""
    manifest: dict[str, dict[str, object]] = {}
    for name in names:
        path = write_domain(name, out, max_chars)
        raw = path.read_bytes()
        docs = [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines()]
        manifest[name] = {
            "file": path.name,
            "documents": len(docs),
            "characters": sum(len(d) for d in docs),
            "sha256": hashlib.sha256(raw).hexdigest(),
            "license": LICENSES[name],
        }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
