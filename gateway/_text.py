"""Text as logs, audit events and terminals show it. No imports: the CLIs load it at start."""

from __future__ import annotations


def shown(text: str, *, lines: bool = False) -> str:
    """``text`` with each character that cannot be shown (a control character such as ESC or CR,
    a format character such as a bidi override, a separator other than the space) written as its
    Python escape: ``\\x1b``. What a caller put in a certificate or a key id then cannot forge a
    log line or an audit event, nor move the cursor, recolour or clear a terminal. ``lines``:
    keep line breaks (``\\n``), for text a terminal shows on several lines."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or (lines and ch == "\n") else ch.encode("unicode_escape").decode("ascii")
                   for ch in text)
