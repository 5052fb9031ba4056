"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from router.placement.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    """An empty SQLite placement store in a fresh file."""
    s = SqliteStore(tmp_path / "placements.db")
    yield s
    s.close()
