"""Strict JSON: one meaning for every reader, and deterministic bytes for every writer.

Python's parser accepts duplicate keys (keeping the last) and ``NaN``/``Infinity``; another
verifier's parser may read such a document differently, and what was signed must mean one thing
to everyone. :func:`loads_strict` refuses both, and nesting deep enough to crash the parser.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class StrictJSONError(ValueError):
    """A document is not strict JSON; the message says why, without naming the document.

    ``kind`` is ``"duplicate"`` (``key`` is the key), ``"constant"`` (``key`` is NaN or
    Infinity), ``"depth"`` or ``"syntax"``, for callers that word their own message.
    """

    def __init__(self, message: str, kind: str, key: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.key = key


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"has the key {key!r} twice", "duplicate", key)
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise StrictJSONError(f"holds {name}, which is not JSON", "constant", name)


def loads_strict(data: bytes | str) -> Any:
    """Parse UTF-8 JSON with no duplicate keys and no NaN or Infinity.

    Raises :class:`StrictJSONError` ("has the key 'x' twice", "holds NaN, which is not JSON",
    "nests too deeply", "is not valid UTF-8 JSON: ..."); callers prefix what was read.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except StrictJSONError:
        raise
    except RecursionError as err:
        raise StrictJSONError("nests too deeply", "depth") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StrictJSONError(f"is not valid UTF-8 JSON: {err}", "syntax") from err


def canonical_json(doc: Any) -> bytes:
    """Compact, key-sorted UTF-8 JSON: equal content gives equal bytes (for digests)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON deterministically (sorted keys, indented), so equal content gives equal bytes.

    Not atomic by itself: use it inside an atomic directory, or use
    :func:`flexfed.common.util.fs.atomic_write_text` with :func:`dumps_pretty`.
    """
    path.write_text(dumps_pretty(doc), encoding="utf-8")


def dumps_pretty(doc: Any) -> str:
    """The text :func:`write_json` writes."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"
