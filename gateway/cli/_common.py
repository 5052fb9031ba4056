"""Shared CLI plumbing: logging set-up and the one-line failure exit."""

from __future__ import annotations

import logging
import sys
from typing import NoReturn, TextIO


def setup_logging(verbose: bool = False, *, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """JSON lines when ``stream`` (default stderr) is not a terminal, else human; see gateway.logs."""
    from gateway.logs import configure

    configure(level=logging.DEBUG if verbose else logging.INFO, fmt=fmt, stream=stream or sys.stderr)


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
