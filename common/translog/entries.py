"""Log entries: canonical JSON objects with a ``type``, as bytes; generic over the vocabulary.

A log holds whatever events its owner defines (flexfed's are in
:mod:`flexfed.common.trust.log_events`); this module only fixes their form, so that the bytes
an auditor sees decode to exactly what was logged: a JSON object with a string ``type`` (one of
``types`` when given), sorted keys, no whitespace, no NaN, at most :data:`MAX_ENTRY_BYTES`.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any, Final

from flexfed.common.errors import (
    InvalidInputError,
)

MAX_ENTRY_BYTES: Final = 1 << 20


class EntryError(InvalidInputError):
    """An event or entry is not a canonical JSON object with a known ``type``."""


# --- entries -------------------------------------------------------------------------------


def canonical_entry(event: Mapping[str, Any], types: Collection[str] | None = None) -> bytes:
    """The log entry for an event: its canonical JSON (sorted keys, no spaces) as bytes.

    The event must have a string ``type`` (one of ``types``, when given) and survive a JSON
    round trip unchanged (string keys, lists not tuples, finite numbers), so that the bytes an
    auditor sees decode to exactly what was logged.
    """
    if not isinstance(event, Mapping):
        raise EntryError(f"an event must be a JSON object, not {type(event).__name__}")
    kind = event.get("type")
    if not isinstance(kind, str) or not kind:
        raise EntryError(f"an event needs a non-empty string type, not {kind!r}")
    if types is not None and kind not in types:
        raise EntryError(f"event type {kind!r} is not one of {sorted(types)}")
    try:
        data = json.dumps(event, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as err:
        raise EntryError(f"{kind} event is not JSON-serialisable: {err}") from err
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"{kind} event is {len(data)} bytes; the limit is {MAX_ENTRY_BYTES}")
    if json.loads(data) != dict(event):
        raise EntryError(
            f"{kind} event changes in a JSON round trip; use string keys and lists, not tuples"
        )
    return data


def parse_canonical(data: bytes, types: Collection[str] | None = None) -> dict[str, Any]:
    """Decode an entry back to its event, refusing anything that is not canonical."""
    try:
        event = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise EntryError(f"log entry is not valid JSON: {err}") from err
    if not isinstance(event, dict):
        raise EntryError("log entry is not a JSON object")
    if canonical_entry(event, types) != data:
        raise EntryError("log entry is not in canonical form (sorted keys, no whitespace)")
    return event
