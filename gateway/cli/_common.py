"""Shared CLI plumbing: logging set-up, the one-line failure exit, argument types."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import NoReturn, TextIO

from gateway._text import shown as shown  # one escaping for the gateway and the CLIs


def setup_logging(verbose: bool = False, *, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """JSON lines when ``stream`` (default stderr) is not a terminal, else human; see gateway.logs."""
    from gateway.logs import configure

    configure(level=logging.DEBUG if verbose else logging.INFO, fmt=fmt, stream=stream or sys.stderr)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {shown(message, lines=True)}", file=sys.stderr)
    raise SystemExit(code)


def at_least_one(text: str) -> int:
    """An argparse type: a whole number of 1 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above 0 (a deadline of 0 or less has passed
    before the call starts)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def plural(count: int, word: str) -> str:
    """``count`` and ``word``, with an s unless there is one: "1 key", "0 keys", "2 records"."""
    return f"{count} {word}" + ("" if count == 1 else "s")
