"""Reconnection against a real server: backoff, reclaiming the source with takeover, refreshing
kinds, TAKEN_OVER, writes while disconnected, on_reconnect.

`Proxy` (also used by the subscription and mirror tests) sits between a client and the server so
that a test can cut the client off — both sides, or only the client's side, leaving a half-open
connection on the server — and keep it away while other clients write.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated

import pytest

import convergedb as cdb
from convergedb.client.reconnect import ReconnectPolicy, is_permanent_refusal, should_reconnect
from convergedb.protocol import ErrorCode
from convergedb.protocol.codes import DeleteCause
from server_fixture import ServerProcess

TIMEOUT = 15.0


class Proxy:
    """A TCP proxy to the server. `refuse()` closes new connections at once (a client's
    reconnection attempts fail) until `accept()`; `cut()` drops the live links."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.accepting = True
        self.links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        self._keep_open: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def refuse(self) -> None:
        self.accepting = False

    def accept(self) -> None:
        self.accepting = True

    def cut(self, *, client_side_only: bool = False) -> None:
        """Drop every link. With `client_side_only`, the server's side stays open and silent
        (a half-open connection the server has not noticed)."""
        links, self.links = self.links, []
        for client, upstream in links:
            client.transport.abort()
            if not client_side_only:
                upstream.transport.abort()
            else:
                self._keep_open.append(upstream)

    async def close(self) -> None:
        self.cut()
        for upstream in self._keep_open:
            upstream.transport.abort()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links.append((writer, up_writer))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        if sink not in self._keep_open:  # a half-open link stays open on the server's side
            sink.transport.abort()


@pytest.fixture
async def proxy(server: ServerProcess) -> AsyncIterator[Proxy]:
    instance = Proxy(*server.address)
    await instance.start()
    yield instance
    await instance.close()


class Reconnections:
    """An `on_reconnect` callback that a test can wait on."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    def __call__(self, client: cdb.Client) -> None:
        assert client.connected
        self.count += 1
        self._event.set()

    async def wait(self, count: int = 1) -> None:
        async with asyncio.timeout(TIMEOUT):
            while self.count < count:
                self._event.clear()
                await self._event.wait()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Wait until `predicate()` holds (a client-side state that changes on its own)."""
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.01)
    assert predicate(), what


@cdb.kind("reconnect_thing")
class Thing:
    label: Annotated[str, cdb.String(0, max_length=16)] = ""
    count: Annotated[int, cdb.U32(1)] = 0


@cdb.kind("reconnect_other")
class Other:
    value: Annotated[int, cdb.U64(0)] = 0


# --- the policy, without a server -----------------------------------------------------------


def test_backoff_doubles_from_100_ms_up_to_10_s() -> None:
    delays = ReconnectPolicy().delays()
    assert [next(delays) for _ in range(10)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10]
    custom = ReconnectPolicy(initial_delay=0.5, max_delay=1.5).delays()
    assert [next(custom) for _ in range(4)] == [0.5, 1.0, 1.5, 1.5]
    with pytest.raises(ValueError, match="positive"):
        ReconnectPolicy(initial_delay=0)
    with pytest.raises(ValueError, match="at least"):
        ReconnectPolicy(initial_delay=2, max_delay=1)


def test_what_is_retried() -> None:
    taken = cdb.TakenOver(ErrorCode.TAKEN_OVER, 0, "taken")
    assert not should_reconnect(cdb.ConnectionLost("closed", taken))
    shutting = cdb.ShuttingDown(ErrorCode.SHUTTING_DOWN, 0, "bye")
    assert should_reconnect(cdb.ConnectionLost("closed", shutting))
    slow = cdb.SlowSubscriber(ErrorCode.SLOW_SUBSCRIBER, 0, "slow")
    assert should_reconnect(cdb.ConnectionLost("closed", slow))
    assert should_reconnect(cdb.ConnectionLost("reset"))
    assert not is_permanent_refusal(ConnectionRefusedError())
    assert not is_permanent_refusal(TimeoutError())
    assert not is_permanent_refusal(shutting)
    assert is_permanent_refusal(cdb.AuthFailed(ErrorCode.AUTH_FAILED, 1, "no"))
    assert is_permanent_refusal(cdb.Forbidden(ErrorCode.FORBIDDEN, 1, "no"))


# --- against a server -----------------------------------------------------------------------


async def test_a_writer_reconnects_after_a_restart_and_keeps_its_source(
    server: ServerProcess,
) -> None:
    back = Reconnections()
    async with cdb.connect(
        *server.address, source_id=7, name="keeper", on_reconnect=back
    ) as client:
        things = await client.register_kind(Thing)
        await things.assert_(1, Thing("one", 1))
        await client.sync()
        await server.restart()
        await back.wait()
        assert client.connected and not client.reconnecting and not client.closed
        assert client.source_id == 7 and client.reconnects == 1
        result = await things.query(1)
        assert result.alive and result.source_set == 1 << 7 and result.version == 1
        await things.patch(1, count=2)
        await client.sync()
        assert (await things.query(1)).value == Thing("one", 2)


async def test_writes_while_disconnected_raise_at_once(server: ServerProcess, proxy: Proxy) -> None:
    back = Reconnections()
    async with cdb.connect(
        *proxy.address, reconnect_delay=0.05, reconnect_max_delay=0.1, on_reconnect=back
    ) as client:
        things = await client.register_kind(Thing)
        proxy.refuse()
        proxy.cut()
        await eventually(lambda: client.reconnecting, "the client notices the cut")
        assert not client.connected and client.closed
        with pytest.raises(cdb.ConnectionLost):
            await things.assert_(1, Thing("lost", 1))
        with pytest.raises(cdb.ConnectionLost):
            await client.sync()
        with pytest.raises(cdb.ConnectionLost):
            client.batch()
        with pytest.raises(TimeoutError):
            await client.wait_connected(timeout=0.2)
        proxy.accept()
        await client.wait_connected(timeout=TIMEOUT)
        await back.wait()
        await things.assert_(1, Thing("back", 1))
        await client.sync()
        assert (await things.query(1)).value == Thing("back", 1)


async def test_backoff_keeps_trying_while_the_server_is_away(
    server: ServerProcess, proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="convergedb.client")
    back = Reconnections()
    async with cdb.connect(
        *proxy.address, reconnect_delay=0.02, reconnect_max_delay=0.16, on_reconnect=back
    ) as client:
        proxy.refuse()
        proxy.cut()
        await eventually(lambda: client.reconnecting, "the client notices the cut")
        await asyncio.sleep(1.0)  # the cause of the backoff being tested: the server stays away
        proxy.accept()
        await back.wait()
    failures = [r for r in caplog.records if "reconnection attempt" in r.getMessage()]
    # 0.02 + 0.04 + 0.08 + 0.16 + 0.16 ... : about 8 attempts in one second, not 50
    assert 3 <= len(failures) <= 12, [r.getMessage() for r in failures]
    gaps = [b.created - a.created for a, b in itertools.pairwise(failures)]
    assert all(gap >= 0.015 for gap in gaps), gaps


async def test_takeover_of_a_half_open_connection_keeps_the_entities(
    server: ServerProcess, proxy: Proxy
) -> None:
    """The client's side is cut but the server still sees the old connection alive: the client
    reclaims its source with takeover, and nothing is retracted."""
    back = Reconnections()
    errors: list[cdb.ConvergeError] = []
    async with (
        cdb.connect(
            *proxy.address, source_id=3, name="half-open", on_reconnect=back, on_error=errors.append
        ) as client,
        cdb.connect(*server.address, read_only=True) as reader,
    ):
        things = await client.register_kind(Thing)
        for key in range(20):
            await things.assert_(key, Thing(f"t{key}", key))
        await client.sync()
        proxy.cut(client_side_only=True)
        await back.wait()
        assert client.source_id == 3
        watched = await reader.resolve_kind(Thing)
        for key in range(20):
            result = await watched.query(key)
            assert result.alive and result.source_set == 1 << 3 and result.version == 1
        await things.patch(0, count=100)
        await client.sync()
        assert (await watched.query(0)).value == Thing("t0", 100)
    assert not [e for e in errors if isinstance(e, cdb.TakenOver)], "the new connection stays"


async def test_the_writer_keeps_its_entities_past_the_deadline(
    server: ServerProcess, proxy: Proxy
) -> None:
    """Two writers are cut off with a 1 s liveness deadline; one reconnects, the other does not.
    Once the server has retracted the one that stayed away (liveness expiry, seen live), the one
    that came back still asserts all its entities."""
    back = Reconnections()
    liveness = {"liveness_deadline_ms": 1000, "heartbeat_interval_ms": 200}
    async with (
        cdb.connect(*proxy.address, source_id=11, on_reconnect=back, **liveness) as keeper,
        cdb.connect(*proxy.address, source_id=12, reconnect=False, **liveness) as leaver,
        cdb.connect(*server.address, read_only=True) as reader,
    ):
        kept = await keeper.register_kind(Thing)
        left = await leaver.register_kind(Thing)
        for key in range(10):
            await kept.assert_(key, Thing("kept", key))
        await left.assert_(100, Thing("left", 100))
        await keeper.sync()
        await leaver.sync()
        watched = await reader.resolve_kind(Thing)
        async with watched.subscribe(bootstrap=False) as changes:
            proxy.cut()
            await back.wait()
            async with asyncio.timeout(TIMEOUT):
                async for change in changes:
                    if isinstance(change, cdb.Change) and change.deleted:
                        break
            assert cdb.id_to_int(change.entity_id) == 100
            assert change.cause is DeleteCause.LIVENESS
        assert leaver.closed and not leaver.reconnecting
        for key in range(10):
            result = await watched.query(key)
            assert result.alive and result.source_set == 1 << 11 and result.version == 1


async def test_taken_over_is_not_reconnected(server: ServerProcess) -> None:
    errors: list[cdb.ConvergeError] = []
    async with cdb.connect(*server.address, source_id=9, on_error=errors.append) as old:
        things = await old.register_kind(Thing)
        async with cdb.connect(*server.address, source_id=9, takeover=True) as new:
            await eventually(lambda: old.closed, "the old holder is closed")
            assert not old.reconnecting
            with pytest.raises(cdb.ConnectionLost) as caught:
                await old.wait_connected(timeout=1)
            assert isinstance(caught.value.reason, cdb.TakenOver)
            with pytest.raises(cdb.ConnectionLost):
                await things.assert_(1, Thing("old", 1))
            assert new.connected and new.source_id == 9
        assert any(isinstance(e, cdb.TakenOver) for e in errors)
        assert old.reconnects == 0


async def test_reconnect_off_leaves_the_client_closed(server: ServerProcess, proxy: Proxy) -> None:
    async with cdb.connect(*proxy.address, reconnect=False) as client:
        proxy.cut()
        await eventually(lambda: client.closed, "the client notices the cut")
        assert not client.reconnecting
        with pytest.raises(cdb.ConnectionLost):
            await client.wait_connected()
        with pytest.raises(cdb.ConnectionLost):
            await client.sync()


async def test_kinds_are_registered_again_on_a_new_server(
    server: ServerProcess, tmp_path: Path
) -> None:
    """The client reconnects to a server with an empty data directory: its kinds are
    registered again (with new ids), and its handles follow."""
    back = Reconnections()
    async with cdb.connect(*server.address, on_reconnect=back, reconnect_max_delay=0.2) as client:
        await client.register_kind(Other)  # takes an id on the first server only
        things = await client.register_kind(Thing)
        old_id = things.kind_id
        await things.assert_(1, Thing("first", 1))
        await client.sync()
        await server.stop()
        fresh = ServerProcess(tmp_path, server.args, data_dir=tmp_path / "fresh")
        fresh.port = server.port
        await fresh.start()
        try:
            await back.wait()
            assert things.kind_id != old_id
            assert not (await things.query(1)).found  # an empty server
            await things.assert_(2, Thing("second", 2))
            await client.sync()
            assert (await things.query(2)).value == Thing("second", 2)
        finally:
            await client.close()
            await fresh.stop()


async def test_an_async_on_reconnect_can_write(server: ServerProcess, proxy: Proxy) -> None:
    written = asyncio.Event()

    async def reassert(client: cdb.Client) -> None:
        things = await client.register_kind(Thing)
        await things.assert_(5, Thing("again", client.reconnects))
        await client.sync()
        written.set()

    async with cdb.connect(*proxy.address, on_reconnect=reassert) as client:
        things = await client.register_kind(Thing)
        proxy.cut()
        async with asyncio.timeout(TIMEOUT):
            await written.wait()
        assert (await things.query(5)).value == Thing("again", 1)
