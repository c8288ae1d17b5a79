"""The one clock: timezone-aware UTC, and its ISO-8601 text, for logs, records and certificates."""

from __future__ import annotations

import datetime as dt


def utc_now() -> dt.datetime:
    """Now, in UTC (timezone-aware)."""
    return dt.datetime.now(dt.UTC)


def utc_now_seconds() -> dt.datetime:
    """Now, in UTC, to the second (what certificates and log records carry)."""
    return utc_now().replace(microsecond=0)


def utc_now_iso() -> str:
    """Now as ISO-8601 text to the second, e.g. ``2026-12-04T18:00:00+00:00``."""
    return utc_now_seconds().isoformat()


def as_utc(when: dt.datetime) -> dt.datetime:
    """``when`` in UTC; a naive time is taken to be UTC already."""
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
