"""The protocol connection under the client: stream ids, concurrent requests, flow control."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Annotated

import pytest
import uvloop

import convergedb as cdb
from convergedb.client.connection import COALESCE_LIMIT, MAX_STREAM_ID, WRITE_BUFFER_HIGH
from convergedb.protocol import Message, Ok, Sync
from server_fixture import ServerProcess


@cdb.kind("counter")
class Counter:
    value: Annotated[int, cdb.U64(0)] = 0
    label: Annotated[str, cdb.String(1, max_length=200)] = ""


class Collect:
    """A stream sink that keeps what it is given (the server sends nothing to it here)."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.failure: BaseException | None = None

    def deliver(self, message: Message) -> bool:
        self.messages.append(message)
        return True

    def fail(self, exc: BaseException) -> None:
        self.failure = exc


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[cdb.Client]:
    async with cdb.connect(server.host, server.port) as client:
        yield client


async def test_stream_ids_wrap_around_and_skip_ids_in_use(client: cdb.Client) -> None:
    connection = client.connection
    sinks = [Collect() for _ in range(3)]
    first = connection.open_stream(sinks[0])
    assert first != 0
    connection._next_stream = MAX_STREAM_ID  # as if 65,534 requests had been made
    assert connection.open_stream(sinks[1]) == MAX_STREAM_ID
    # the next id wraps to 1 (never 0), skipping an id still in use
    after_wrap = connection.open_stream(sinks[2])
    assert after_wrap == (2 if first == 1 else 1)
    for stream_id in (first, MAX_STREAM_ID, after_wrap):
        connection.release_stream(stream_id)
    assert connection.in_flight == 0
    # requests still work, on reused ids
    assert await client.sync() >= 0


async def test_many_concurrent_requests_get_their_own_replies(client: cdb.Client) -> None:
    counters = await client.register_kind(Counter)
    for number in range(50):
        await counters.assert_(number, Counter(number, f"counter {number}"))
    await client.sync()
    results = await asyncio.gather(*(counters.query(number) for number in range(50)))
    assert [result.value for result in results] == [
        Counter(number, f"counter {number}") for number in range(50)
    ]
    assert client.connection.in_flight == 0


async def test_a_cancelled_request_keeps_its_stream_until_the_reply(
    client: cdb.Client, server: ServerProcess
) -> None:
    connection = client.connection
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)  # no reply until SIGCONT
    try:
        task = asyncio.ensure_future(connection.request(Sync()))
        await asyncio.sleep(0)  # the request is sent and waits for its reply
        assert connection.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert connection.in_flight == 1  # a late reply must not reach another request
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    reply = await connection.request(Sync())  # answered after the cancelled one
    assert isinstance(reply, Ok)
    assert connection.in_flight == 0


async def test_a_fast_writer_waits_for_the_socket(
    client: cdb.Client, server: ServerProcess
) -> None:
    counters = await client.register_kind(Counter)
    connection = client.connection
    transport = connection._transport
    assert transport is not None and server.process is not None
    label = "x" * 200
    frame_size = len(cdb.kind_model(Counter).encode(Counter(0, label))) + 100
    written = 0

    async def write_until_cancelled() -> None:
        nonlocal written
        for number in range(10_000_000):
            await counters.assert_(number, Counter(number, label))
            written = number + 1

    os.kill(server.process.pid, signal.SIGSTOP)  # the server stops reading
    try:
        writer = asyncio.ensure_future(write_until_cancelled())
        while not connection.writing_paused and not writer.done():
            await asyncio.sleep(0)  # let the writer run until the socket is full
        assert connection.writing_paused and not writer.done()
        assert transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH + COALESCE_LIMIT + frame_size
        writer.cancel()  # it waits in drain, after its last frame was buffered whole
        with pytest.raises(asyncio.CancelledError):
            await writer
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    await client.sync()
    last = written  # the cancelled write was buffered before its drain: it counts too
    assert (await counters.query(last)).value == Counter(last, label)
    assert not (await counters.query(last + 1)).found


async def test_a_stream_sink_fails_when_the_connection_closes(client: cdb.Client) -> None:
    sink = Collect()
    client.connection.open_stream(sink)
    await client.close()
    assert isinstance(sink.failure, cdb.ConnectionLost)


def test_the_client_runs_on_uvloop(server_address: tuple[str, int]) -> None:
    async def round_trip() -> Counter | None:
        async with cdb.connect(*server_address) as client:
            counters = await client.register_kind(Counter)
            await counters.assert_(1, Counter(1, "uv"))
            await client.sync()
            return (await counters.query(1)).value

    assert uvloop.run(round_trip()) == Counter(1, "uv")


@pytest.fixture
def server_address(server: ServerProcess) -> tuple[str, int]:
    return server.address
