"""Option parsing shared by several commands."""

from __future__ import annotations

import re

from flexfed.common.errors import ConfigError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000; '2GiB' -> 2**31; a bare number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"cannot read size {text!r}; use e.g. 500MB, 2GB or 1073741824")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"size must be positive, got {text!r}")
    return size
