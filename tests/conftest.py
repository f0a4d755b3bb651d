"""Fixtures shared by the suites: the state store on each database the node supports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.cards import load_cards
from inference.triton import InferenceClient, LocalTriton
from tests.peers import ROOT, Postgres


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    """The real tritonserver with the bundled models, all of them ready; one per module."""
    server = LocalTriton(tmp_path_factory.mktemp("triton"))
    server.start()
    try:
        cards = load_cards(ROOT / "config" / "models")
        InferenceClient(server.url("http")).wait_ready(
            [c.triton_model for c in cards.values()], 120
        )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One real PostgreSQL server for the session (each test gets a database of its own)."""
    server = Postgres.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty state store: SQLite in the test's folder, or a database on the session's
    PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.new_database()
