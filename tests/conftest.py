"""Shared test configuration."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from server_fixture import ServerProcess, running_server
from wire_client import close_all

# The machine is shared and stalls now and then: per-example deadlines would make property
# tests flaky without telling us anything about correctness.
settings.register_profile(
    "convergedb", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("convergedb")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    """A server with default settings in a subprocess (see `server_fixture.running_server`)."""
    async with running_server(tmp_path) as process:
        yield process


@pytest.fixture(autouse=True)
async def _close_wire_clients() -> AsyncIterator[None]:
    """Raw protocol clients are closed after each test, so no socket outlives it."""
    yield
    await close_all()
