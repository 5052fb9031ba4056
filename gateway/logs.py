"""Log output: JSON lines for containers, a readable line for people, a request id on both.

``configure`` sets up the root logger once, from the CLI (never at import):

- ``json``: one JSON object per line — ``time`` (UTC, ISO 8601), ``level``,
  ``logger``, ``message``, ``request_id`` while a request is being served,
  ``exception`` with the traceback, and any ``extra=`` fields. Lines of the
  ``hsmgw.audit`` logger (already JSON) are embedded as an ``audit`` object.

Two other writers share the stream, and are made to keep to it (``hsmgw serve`` calls both):

- ``quiet_grpc_core``: gRPC core logs through absl straight to stderr, in a format of its
  own (``I1130 12:00:00.123 … chttp2_transport.cc:… ping_timeout``), from INFO up unless
  ``GRPC_VERBOSITY`` says otherwise; it is set to ``ERROR`` unless the operator set it,
  or to ``INFO`` in a gateway that serves TLS: core logs a refused handshake at INFO only.
- ``capture_unraisable``: an exception raised where Python cannot raise it (a finalizer,
  ``__del__``) is printed on stderr as ``Exception ignored in: …`` and a traceback; it
  becomes one WARNING line instead (logger ``hsmgw.unraisable``), naming the exception's
  type and where it was ignored; the traceback only with ``-v``. So does the traceback an
  extension prints for it first, from a thread other than the main one, through
  ``sys.excepthook``; the main thread's own uncaught exception is one ERROR line with it.
- ``human``: ``time level [request id] logger: message``.
- ``auto`` (the default): ``human`` when the stream is a terminal, else ``json``
  (containers and log shippers read stdout/stderr through a pipe).
  ``HSMGW_LOG_FORMAT`` overrides ``auto``.

The request id lives in a ``contextvars.ContextVar``: ``gateway.metrics``'s
interceptor sets it for the duration of each RPC (from the caller's
``x-request-id`` metadata, else a new one), so every line logged while serving
that RPC — servicer, router, audit — carries it.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import random
import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, TextIO

REQUEST_ID_HEADER = "x-request-id"
FORMATS = ("auto", "json", "human")
ENV_FORMAT = "HSMGW_LOG_FORMAT"
AUDIT_LOGGER = "hsmgw.audit"

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("hsmgw_request_id", default=None)
# What a caller may choose as a request id: short, printable, no spaces or quotes
# (it lands in every log line, so nothing that could forge or break one).
_VALID_ID = re.compile(r"[A-Za-z0-9._:/@+=-]{1,128}")

# Attributes every LogRecord has; anything else came from ``extra=`` and is logged.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


def current_request_id() -> str | None:
    """The id of the request this thread is serving, if any."""
    return _REQUEST_ID.get()


def new_request_id() -> str:
    # A correlation id, not a secret: the interpreter's generator (seeded from the OS at
    # start) serves it without the system call os.urandom makes on every request.
    return f"{random.getrandbits(128):032x}"


def accept_request_id(value: str | None) -> str:
    """The caller's id if it is acceptable, else a new one."""
    if value and _VALID_ID.fullmatch(value):
        return value
    return new_request_id()


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    """Make ``request_id`` current; pass the token to ``reset_request_id`` when the request ends."""
    return _REQUEST_ID.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _REQUEST_ID.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id when it is made (in the caller's thread)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ASCII only, so a caller's string cannot break a line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        request_id = getattr(record, "request_id", None) or _REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if record.name == AUDIT_LOGGER:
            try:
                entry["audit"] = json.loads(message)
            except ValueError:
                pass
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str)


class HumanFormatter(logging.Formatter):
    """``2026-01-02 03:04:05,678 INFO [req-id] router.router: message`` (no ``[…]`` outside requests).

    The id comes before the logger name so that ``" <logger>: "`` still introduces the
    message, as in the plain format (scripts split audit lines on ``" hsmgw.audit: "``).
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(request_tag)s%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None) or _REQUEST_ID.get()
        record.request_tag = f"[{request_id}] " if request_id else ""
        return super().format(record)


def choose_format(fmt: str, stream: TextIO, environ: dict[str, str] | None = None) -> str:
    """``json`` or ``human`` for ``fmt`` (auto: the environment, then whether ``stream`` is a terminal)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        env = os.environ if environ is None else environ
        fmt = env.get(ENV_FORMAT, "auto").strip().lower() or "auto"
        if fmt not in FORMATS:
            raise ValueError(f"{ENV_FORMAT}={fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "human" if isatty is not None and isatty() else "json"
    return fmt


_HANDLER_MARK = "_hsmgw_handler"
QUIET_LOGGERS = ("botocore", "boto3", "urllib3", "s3transfer")
"""Chatty at INFO ("Found credentials in environment variables"): WARNING unless debugging."""


def configure(*, level: int = logging.INFO, fmt: str = "auto", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record to ``stream`` (default stderr) in the chosen format; returns the handler.

    Replaces a handler an earlier call installed, so calling it twice does not
    double every line.
    """
    stream = stream if stream is not None else sys.stderr
    chosen = choose_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else HumanFormatter())
    handler.addFilter(RequestIdFilter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if level <= logging.DEBUG else logging.WARNING)
    return handler


GRPC_VERBOSITY = "GRPC_VERBOSITY"
QUIET_GRPC_VERBOSITY = "ERROR"
"""gRPC core's log level unless the operator chose one: its errors only."""
HANDSHAKES_GRPC_VERBOSITY = "INFO"
"""gRPC core's log level in a gateway that serves TLS, unless the operator chose one: the only
trace of a client refused in the handshake (no certificate, another CA's, an expired one) is
core's INFO line; nothing in grpcio tells Python of it (docs/security.md)."""
UNRAISABLE_LOGGER = "hsmgw.unraisable"


def quiet_grpc_core(environ: MutableMapping[str, str] | None = None, *, level: str = QUIET_GRPC_VERBOSITY) -> None:
    """Set ``GRPC_VERBOSITY`` to ``level`` unless it is set (``GRPC_VERBOSITY=INFO`` brings gRPC
    core's INFO lines back). gRPC reads it once, when grpc is first imported: call this before
    that; processes started from this one inherit it."""
    env = os.environ if environ is None else environ
    if not env.get(GRPC_VERBOSITY, "").strip():
        env[GRPC_VERBOSITY] = level


def _log_unraisable(unraisable: Any) -> None:
    exc = unraisable.exc_value
    kind = unraisable.exc_type.__name__ if unraisable.exc_type is not None else "exception"
    where = unraisable.err_msg or "Exception ignored in"
    if unraisable.object is not None:
        try:
            where = f"{where}: {unraisable.object!r}"
        except Exception:  # noqa: BLE001 - a repr that fails must not lose the line
            where = f"{where}: a {type(unraisable.object).__name__}"
    logger = logging.getLogger(UNRAISABLE_LOGGER)
    detail = f" ({exc})" if exc is not None and str(exc) else ""
    debugging = logger.isEnabledFor(logging.DEBUG)
    exc_info = (unraisable.exc_type, exc, unraisable.exc_traceback) if debugging and exc is not None else None
    logger.warning("%s: %s%s", where, kind, detail, exc_info=exc_info,
                   extra={"exception_type": kind})


def _log_printed(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    """``sys.excepthook``: the main thread's uncaught exception, at ERROR with its traceback. A
    C extension also prints an error it cannot raise through this hook, from any thread
    (Cython does, before it reports it as unraisable): such a one gets the unraisable line."""
    if threading.current_thread() is not threading.main_thread():
        logger = logging.getLogger(UNRAISABLE_LOGGER)
        exc_info = (kind, exc, tb) if logger.isEnabledFor(logging.DEBUG) else None
        logger.warning("error printed by an extension: %s", kind.__name__, exc_info=exc_info,
                       extra={"exception_type": kind.__name__})
        return
    logging.getLogger(UNRAISABLE_LOGGER).error("uncaught exception: %s", kind.__name__, exc_info=(kind, exc, tb),
                                                extra={"exception_type": kind.__name__})


def capture_unraisable() -> None:
    """Log what Python could not raise (``sys.unraisablehook``), and what an extension prints
    instead (``sys.excepthook``), as one line each, not a traceback on stderr."""
    sys.unraisablehook = _log_unraisable
    sys.excepthook = _log_printed


__all__ = [
    "AUDIT_LOGGER",
    "ENV_FORMAT",
    "FORMATS",
    "GRPC_VERBOSITY",
    "HumanFormatter",
    "JsonFormatter",
    "QUIET_LOGGERS",
    "REQUEST_ID_HEADER",
    "RequestIdFilter",
    "UNRAISABLE_LOGGER",
    "accept_request_id",
    "capture_unraisable",
    "choose_format",
    "configure",
    "current_request_id",
    "new_request_id",
    "quiet_grpc_core",
    "reset_request_id",
    "set_request_id",
]
