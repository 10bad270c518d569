"""The client SDK against a real server: connecting, sources, closing, losing the connection."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

import convergedb as cdb
from client_helpers import Errors
from convergedb.limits import DEFAULT_MAX_PAYLOAD
from convergedb.protocol import ErrorCode
from server_fixture import ServerProcess, running_server

TIMEOUT = 10.0


# --- connecting -----------------------------------------------------------------------------


async def test_connect_allocates_a_source(server: ServerProcess) -> None:
    client = await cdb.connect(server.host, server.port, name="allocating")
    try:
        assert client.source_id is not None
        assert 0 <= client.source_id <= 63
        assert not client.read_only
        assert client.liveness_deadline_ms == 30_000
        assert client.window_ms > 0
        assert client.max_payload == DEFAULT_MAX_PAYLOAD
        assert client.server_version
        assert not client.closed
    finally:
        await client.close()
    assert client.closed


async def test_allocation_gives_the_lowest_free_sources(server: ServerProcess) -> None:
    async with (
        cdb.connect(server.host, server.port) as first,
        cdb.connect(server.host, server.port) as second,
    ):
        assert {first.source_id, second.source_id} == {0, 1}


async def test_claim_an_explicit_source(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, source_id=7) as client:
        assert client.source_id == 7


async def test_claiming_a_held_source_is_a_source_conflict(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, source_id=3):
        with pytest.raises(cdb.SourceConflict) as caught:
            await cdb.connect(server.host, server.port, source_id=3)
    assert caught.value.code == ErrorCode.SOURCE_CONFLICT
    message = str(caught.value)
    assert "omit source_id" in message and "takeover=True" in message


async def test_a_closed_source_can_be_claimed_again(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, source_id=4) as client:
        await client.sync()
    async with cdb.connect(server.host, server.port, source_id=4) as again:
        assert again.source_id == 4


async def test_takeover_closes_the_old_holder(server: ServerProcess) -> None:
    errors = Errors()
    old = await cdb.connect(server.host, server.port, source_id=9, on_error=errors)
    try:
        async with cdb.connect(server.host, server.port, source_id=9, takeover=True) as new:
            assert new.source_id == 9
            taken = await errors.wait()
            assert isinstance(taken, cdb.TakenOver)
            with pytest.raises(cdb.ConnectionLost) as caught:
                await old.sync()
            assert isinstance(caught.value.reason, cdb.TakenOver)
            assert await new.sync() >= 0
    finally:
        await old.close()


async def test_read_only_connection(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, read_only=True) as client:
        assert client.source_id is None
        assert client.read_only
        assert await client.sync() >= 0


async def test_awaiting_connect_and_async_with_give_the_same_kind_of_client(
    server: ServerProcess,
) -> None:
    client = await cdb.connect(server.host, server.port)
    async with cdb.connect(server.host, server.port) as other:
        assert type(client) is type(other) is cdb.Client
    assert other.closed
    await client.close()


# --- arguments refused before connecting ----------------------------------------------------


def test_a_heartbeat_interval_not_below_the_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="must be below liveness_deadline_ms"):
        cdb.connect(liveness_deadline_ms=10_000, heartbeat_interval_ms=10_000)
    with pytest.raises(ValueError, match="must be below liveness_deadline_ms"):
        cdb.connect(liveness_deadline_ms=10_000, heartbeat_interval_ms=20_000)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"source_id": 64},
        {"source_id": -1},
        {"takeover": True},
        {"read_only": True, "source_id": 1},
        {"read_only": True, "takeover": True},
        {"liveness_deadline_ms": 0},
        {"connect_timeout": 0},
        {"name": "x" * 70_000},
    ],
)
def test_inconsistent_arguments_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        cdb.connect(**kwargs)  # type: ignore[arg-type]


async def test_nothing_listening_is_an_os_error(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        host, port = server.address
    with pytest.raises(OSError):
        await cdb.connect(host, port, connect_timeout=5)


# --- heartbeats and ping --------------------------------------------------------------------


async def test_ping_measures_a_round_trip(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port) as client:
        rtt = await client.ping()
        assert 0 < rtt < TIMEOUT


async def test_heartbeats_keep_a_quiet_connection_alive(server: ServerProcess) -> None:
    async with cdb.connect(
        server.host, server.port, liveness_deadline_ms=600, heartbeat_interval_ms=100
    ) as client:
        assert client.liveness_deadline_ms == 600
        # Stay silent (but for heartbeats) for more than two deadlines: without heartbeats the
        # server would close the connection as dead.
        await asyncio.sleep(1.5)
        assert not client.closed
        assert await client.sync() >= 0


# --- closing and losing the connection ------------------------------------------------------


async def test_close_is_idempotent(server: ServerProcess) -> None:
    client = await cdb.connect(server.host, server.port)
    await client.close()
    await client.close()
    assert client.closed
    with pytest.raises(cdb.ConnectionLost, match="closed by this client"):
        await client.sync()


async def test_async_with_closes_even_on_error(server: ServerProcess) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with cdb.connect(server.host, server.port) as client:
            raise RuntimeError("boom")
    assert client.closed


async def test_killed_server_fails_pending_and_later_calls(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port) as client:
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)  # the request below stays unanswered
        pending = asyncio.ensure_future(client.ping())
        await asyncio.sleep(0)  # let the request go out
        await server.kill()
        with pytest.raises(cdb.ConnectionLost):
            async with asyncio.timeout(TIMEOUT):
                await pending
        assert client.closed
        with pytest.raises(cdb.ConnectionLost):
            await client.sync()


async def test_server_shutdown_is_reported(server: ServerProcess) -> None:
    errors = Errors()
    async with cdb.connect(server.host, server.port, on_error=errors) as client:
        await server.stop()
        shutting_down = await errors.wait()
        assert isinstance(shutting_down, cdb.ShuttingDown)
        with pytest.raises(cdb.ConnectionLost) as caught:
            await client.sync()
        assert isinstance(caught.value.reason, cdb.ShuttingDown)


async def test_reclaiming_a_source_after_a_restart(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, source_id=5) as client:
        await client.sync()
    await server.restart()
    async with cdb.connect(server.host, server.port, source_id=5) as again:
        assert again.source_id == 5


async def test_heartbeats_follow_a_deadline_the_server_capped(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, "--max-liveness-ms", "600") as server,
        cdb.connect(server.host, server.port) as client,
    ):
        assert client.liveness_deadline_ms == 600
        assert client.heartbeat_interval_ms == 300
        await asyncio.sleep(1.5)  # more than two deadlines
        assert not client.closed
        assert await client.sync() >= 0


async def test_tokens(tmp_path: Path) -> None:
    async with running_server(
        tmp_path, "--token", "writer:s3cret:1,2", "--token", "reader:look"
    ) as server:
        with pytest.raises(cdb.AuthFailed, match="token="):
            await cdb.connect(server.host, server.port)
        with pytest.raises(cdb.AuthFailed):
            await cdb.connect(server.host, server.port, token="wrong")
        async with cdb.connect(server.host, server.port, token="s3cret") as writer:
            assert writer.source_id in (1, 2)
        with pytest.raises(cdb.Forbidden):
            await cdb.connect(server.host, server.port, token="s3cret", source_id=5)
        with pytest.raises(cdb.Forbidden):
            await cdb.connect(server.host, server.port, token="look")
        async with cdb.connect(server.host, server.port, token="look", read_only=True) as reader:
            assert reader.read_only
