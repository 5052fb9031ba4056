"""Open a placement store from its URL, and copy placements between stores.

URLs:

``sqlite:PATH``
    ``SqliteStore``; a relative PATH is resolved against ``base_dir``
    (``sqlite:///abs/path.db`` and ``sqlite:/abs/path.db`` are absolute).
``dynamodb://TABLE?region=R[&endpoint=URL][&connect_timeout=S][&read_timeout=S][&max_attempts=N]``
    ``DynamoStore`` on table TABLE in region R. ``endpoint`` points at another
    endpoint (a VPC endpoint, DynamoDB Local, ``moto_server``); credentials come
    from the usual AWS chain (environment, profile, instance or task role).

A malformed URL raises ``ValueError`` naming what is wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from router.placement.store import Conflict, PlacementStore, Stale, StoreError

__all__ = ["CopyReport", "copy_placements", "make_store", "parse_dynamodb_url", "sqlite_path"]

_TABLE_NAME = re.compile(r"[A-Za-z0-9_.-]{3,255}")
_DYNAMODB_PARAMS: dict[str, Callable[[str], Any]] = {
    "region": str,
    "endpoint": str,
    "connect_timeout": float,
    "read_timeout": float,
    "max_attempts": int,
}
_USAGE = "expected sqlite:PATH or dynamodb://TABLE?region=REGION[&endpoint=URL]"


def sqlite_path(url: str, base_dir: Path | str = ".") -> Path:
    """The file a ``sqlite:`` URL names, relative paths resolved against ``base_dir``."""
    path = Path(url[len("sqlite:") :].removeprefix("//"))
    if not str(path) or str(path) == ".":
        raise ValueError(f"store URL {url!r} names no file ({_USAGE})")
    return path if path.is_absolute() else Path(base_dir) / path


def parse_dynamodb_url(url: str) -> tuple[str, dict[str, Any]]:
    """``(table, DynamoStore keyword arguments)`` for a ``dynamodb://`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "dynamodb":
        raise ValueError(f"store URL {url!r} is not a dynamodb:// URL")
    table = parts.netloc
    if parts.path not in ("", "/") or not _TABLE_NAME.fullmatch(table):
        raise ValueError(
            f"store URL {url!r}: table name must be 3-255 letters, digits, '_', '-' or '.' ({_USAGE})"
        )
    options: dict[str, Any] = {}
    for name, raw in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)):
        if name not in _DYNAMODB_PARAMS:
            raise ValueError(f"store URL {url!r}: unknown parameter {name!r} (known: {', '.join(_DYNAMODB_PARAMS)})")
        if name in options or (name == "endpoint" and "endpoint_url" in options):
            raise ValueError(f"store URL {url!r}: parameter {name!r} given twice")
        try:
            value = _DYNAMODB_PARAMS[name](raw)
        except ValueError:
            raise ValueError(f"store URL {url!r}: parameter {name!r} has a bad value {raw!r}") from None
        if value in ("", 0) or (isinstance(value, (int, float)) and value < 0):
            raise ValueError(f"store URL {url!r}: parameter {name!r} must not be empty, zero or negative")
        options["endpoint_url" if name == "endpoint" else name] = value
    if "region" not in options:
        raise ValueError(f"store URL {url!r}: the region parameter is required ({_USAGE})")
    endpoint = options.get("endpoint_url")
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise ValueError(f"store URL {url!r}: endpoint must be an http:// or https:// URL")
    return table, options


def make_store(url: str, base_dir: Path | str = ".") -> PlacementStore:
    """The placement store ``url`` names (see the module docstring)."""
    if url.startswith("sqlite:"):
        from router.placement.sqlite import SqliteStore

        return SqliteStore(sqlite_path(url, base_dir))
    if url.startswith("dynamodb:"):
        table, options = parse_dynamodb_url(url)
        # Imported here so that SQLite-only deployments never load boto3.
        from router.placement.dynamodb import DynamoStore

        return DynamoStore(table, **options)
    raise ValueError(f"unsupported store URL {url!r} ({_USAGE})")


@dataclass
class CopyReport:
    """What ``copy_placements`` did, by key id."""

    copied: list[str] = field(default_factory=list)
    identical: list[str] = field(default_factory=list)
    """Already in the destination, field for field the same: skipped."""
    differing: list[str] = field(default_factory=list)
    """Already in the destination (by key id or request id) with other contents: left alone."""
    failed: list[tuple[str, str]] = field(default_factory=list)
    """(record, why) the destination refused (a record too large for it, say): not copied."""


FAILURES_IN_A_ROW = 5
"""Refused writes in a row after which the destination is taken for unusable and the copy stops."""


def copy_placements(source: PlacementStore, dest: PlacementStore, report: CopyReport | None = None) -> CopyReport:
    """Copy every placement of ``source`` into ``dest``, versions included, and every admin
    record (pending quorum changes, operator switches), reported as ``admin record NAME``.

    Idempotent: a record already present and equal is skipped; one present but
    different is reported and never overwritten (an operator decides which wins). A record
    the destination refuses is reported in ``failed`` and the copy goes on, unless
    ``FAILURES_IN_A_ROW`` fail in a row: then the ``StoreError`` is raised, ``report`` (when
    given) holding what was done so far.
    """
    report = CopyReport() if report is None else report
    in_a_row = 0

    def failing(label: str, exc: StoreError) -> None:
        nonlocal in_a_row
        report.failed.append((label, str(exc)))
        in_a_row += 1
        if in_a_row >= FAILURES_IN_A_ROW:
            raise exc

    for placement in source.scan():
        try:
            existing = dest.get(placement.key_id)
            if existing is None:
                try:
                    dest.create(placement)
                except Conflict as exc:
                    # Created meanwhile, or the request id already made another key.
                    same = exc.existing == placement
                    (report.identical if same else report.differing).append(placement.key_id)
                    in_a_row = 0
                    continue
                report.copied.append(placement.key_id)
            elif existing == placement:
                report.identical.append(placement.key_id)
            else:
                report.differing.append(placement.key_id)
            in_a_row = 0
        except StoreError as exc:
            failing(placement.key_id, exc)
    for name, body, _ in source.admin_records():
        label = f"admin record {name}"
        try:
            found = dest.admin_record(name)
            if found is None:
                try:
                    # Versions restart at 1 in the destination: only the order of writes there matters.
                    dest.put_admin_record(name, body, 0)
                    report.copied.append(label)
                    in_a_row = 0
                    continue
                except Stale:
                    found = dest.admin_record(name)
            (report.identical if found is not None and found[0] == body else report.differing).append(label)
            in_a_row = 0
        except StoreError as exc:
            failing(label, exc)
    for ids in (report.copied, report.identical, report.differing):
        ids.sort()
    return report
