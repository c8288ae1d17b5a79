"""Text from artifacts made safe for a terminal.

Anything an expert's owner (or a coordinator) wrote - an expert.json's license, a name, a
training note - reaches the operator's and the auditor's terminals. Control characters in it
(ESC sequences can rewrite the screen, hide lines or set the window title) are shown escaped,
never sent raw.
"""

from __future__ import annotations

import unicodedata


def printable(text: object) -> str:
    """``str(text)`` with every control or format character shown as an escape (``\\x1b``)."""
    out = []
    for ch in str(text):
        if ch in "\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)
