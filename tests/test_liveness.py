"""Liveness, grace periods, presence (SPEC §3), with short deadlines so the suite stays fast."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    Connect,
    ConnectMode,
    CreateKind,
    Error,
    ErrorCode,
    GetKind,
    KindInfo,
    KindList,
    ListKinds,
    Patch,
    Query,
    QueryResult,
    QueryStatus,
)
from convergedb.schema.rows import RowCodec
from kinds import PLAYER, Player
from server_fixture import ServerProcess, running_server
from wire_client import WireClient

TESTS = Path(__file__).parent
DEADLINE_MS = 600
ROW = PLAYER.encode(Player(name="x"))


async def client(
    server: ServerProcess, mode: ConnectMode = ConnectMode.READ_ONLY, **connect: object
) -> WireClient:
    c = await WireClient.open(server.host, server.port)
    await c.connect(mode, **connect)  # type: ignore[arg-type]
    return c


async def kind_id(c: WireClient) -> int:
    info = await c.request(CreateKind(PLAYER.definition))
    assert isinstance(info, KindInfo)
    return info.kind_id


async def query(c: WireClient, kind: int, entity: int) -> QueryResult:
    result = await c.request(Query(kind, id_from_int(entity)))
    assert isinstance(result, QueryResult)
    return result


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until `check()` holds, asking again every 50 ms (an explicit wait on a condition)."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.05)


async def start_writer_process(
    server: ServerProcess, source_id: int, kind: int, first: int, count: int
) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(TESTS / "writer_process.py"), str(server.port), str(source_id),
        str(DEADLINE_MS), str(kind), str(first), str(count),
        stdout=asyncio.subprocess.PIPE, cwd=TESTS, env={**os.environ, "PYTHONPATH": str(TESTS)},
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 20)
    assert line.strip() == b"ready", line
    return process


async def test_a_killed_writer_is_retracted_after_its_deadline(server: ServerProcess) -> None:
    other = await client(server, ConnectMode.CLAIM, source_id=9)
    kind = await kind_id(other)
    writer = await start_writer_process(server, 3, kind, 0, 20)
    other.send(Assert(kind, id_from_int(15), ROW))  # shared with the writer from here on
    await other.sync()
    assert (await query(other, kind, 15)).source_set == (1 << 3) | (1 << 9)

    killed_at = time.monotonic()
    writer.send_signal(signal.SIGKILL)
    await writer.wait()

    async def sole_owned_gone() -> bool:
        return (await query(other, kind, 0)).status is QueryStatus.TOMBSTONE

    await eventually(sole_owned_gone)
    assert time.monotonic() - killed_at >= DEADLINE_MS / 1000  # never before the deadline
    for entity in range(20):
        result = await query(other, kind, entity)
        if entity == 15:
            assert (result.status, result.source_set) == (QueryStatus.ALIVE, 1 << 9)
        else:
            assert result.status is QueryStatus.TOMBSTONE, entity


async def test_a_writer_that_reconnects_in_time_loses_nothing(server: ServerProcess) -> None:
    deadline = 1500
    writer = await client(
        server,
        ConnectMode.CLAIM,
        source_id=4,
        liveness_deadline_ms=deadline,
        heartbeat_interval_ms=500,
    )
    kind = await kind_id(writer)
    writer.send(Assert(kind, id_from_int(1), ROW))
    version_before = (await writer.sync(), (await query(writer, kind, 1)).version)[1]
    await writer.close()
    writer = await client(
        server,
        ConnectMode.CLAIM,
        source_id=4,
        liveness_deadline_ms=deadline,
        heartbeat_interval_ms=500,
    )
    for _ in range(int(deadline / 250) + 2):  # past the old connection's deadline
        await asyncio.sleep(0.25)
        await writer.sync()  # a heartbeat of sorts: the new connection must stay alive
    result = await query(writer, kind, 1)
    assert (result.status, result.version, result.source_set) == (
        QueryStatus.ALIVE,
        version_before,
        1 << 4,
    )


async def test_a_silent_connection_is_closed_and_its_source_dies_at_once(
    server: ServerProcess,
) -> None:
    watcher = await client(server, ConnectMode.CLAIM, source_id=1)
    kind = await kind_id(watcher)
    silent = await client(
        server,
        ConnectMode.CLAIM,
        source_id=2,
        liveness_deadline_ms=DEADLINE_MS,
        heartbeat_interval_ms=100,
    )
    silent.send(Assert(kind, id_from_int(7), ROW))
    await silent.sync()
    await silent.wait_closed()  # it sends nothing more: the server closes it

    async def retracted() -> bool:
        return (await query(watcher, kind, 7)).status is QueryStatus.TOMBSTONE

    await eventually(retracted, timeout=5.0)


async def test_heartbeats_keep_a_connection_alive(server: ServerProcess) -> None:
    beating = await client(
        server,
        ConnectMode.CLAIM,
        source_id=2,
        liveness_deadline_ms=DEADLINE_MS,
        heartbeat_interval_ms=100,
    )
    kind = await kind_id(beating)
    beating.send(Assert(kind, id_from_int(7), ROW))
    await beating.sync()
    for _ in range(int(3 * DEADLINE_MS / 100)):
        await asyncio.sleep(0.1)
        await beating.sync()  # any frame is a sign of life
    assert (await query(beating, kind, 7)).status is QueryStatus.ALIVE


async def test_grace_periods_and_allocation(server: ServerProcess) -> None:
    first = await client(
        server, ConnectMode.ALLOCATE, liveness_deadline_ms=5000, heartbeat_interval_ms=1000
    )
    kind = await kind_id(first)
    first.send(Assert(kind, id_from_int(1), ROW))
    await first.sync()
    await first.close()  # source 0 is now in its grace period
    second = await WireClient.open(server.host, server.port)
    assert (await second.connect(ConnectMode.ALLOCATE)).source_id == 1  # 0 is skipped
    back = await client(server, ConnectMode.CLAIM, source_id=0)  # claimed in its grace period
    assert (await query(back, kind, 1)).source_set == 1


async def test_the_65th_writer_gets_no_free_source(server: ServerProcess) -> None:
    writers = [await client(server, ConnectMode.ALLOCATE) for _ in range(64)]
    late = await WireClient.open(server.host, server.port)
    late.send(Connect(ConnectMode.ALLOCATE), 3)
    _, reply = await late.reply(3)
    assert isinstance(reply, Error) and reply.code == ErrorCode.NO_FREE_SOURCE
    assert len(writers) == 64


async def test_the_deadline_is_capped_by_the_server(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--max-liveness-ms", "2000") as server:
        c = await WireClient.open(server.host, server.port)
        connected = await c.connect(ConnectMode.ALLOCATE, liveness_deadline_ms=60_000)
        assert connected.liveness_deadline_ms == 2000


async def test_countdowns_start_again_after_a_restart(server: ServerProcess) -> None:
    stays = await client(
        server,
        ConnectMode.CLAIM,
        source_id=5,
        liveness_deadline_ms=4000,
        heartbeat_interval_ms=1000,
    )
    kind = await kind_id(stays)
    goes = await client(
        server,
        ConnectMode.CLAIM,
        source_id=6,
        liveness_deadline_ms=DEADLINE_MS,
        heartbeat_interval_ms=100,
    )
    stays.send(Assert(kind, id_from_int(1), ROW))
    goes.send(Assert(kind, id_from_int(2), ROW))
    await stays.sync()
    await goes.sync()
    await server.restart()
    back = await client(
        server,
        ConnectMode.CLAIM,
        source_id=5,
        liveness_deadline_ms=4000,
        heartbeat_interval_ms=1000,
    )

    async def gone() -> bool:
        return (await query(back, kind, 2)).status is QueryStatus.TOMBSTONE

    await eventually(gone)
    assert (await query(back, kind, 1)).status is QueryStatus.ALIVE


async def test_presence_lists_writers_and_goes_with_their_liveness(server: ServerProcess) -> None:
    reader = await client(server)
    writer = await client(
        server,
        ConnectMode.CLAIM,
        source_id=12,
        name="game-7",
        liveness_deadline_ms=DEADLINE_MS,
        heartbeat_interval_ms=100,
    )
    await writer.sync()
    info = await reader.request(GetKind("convergedb_connections", None))
    assert isinstance(info, KindInfo)
    codec = RowCodec(info.kind.fields)
    names = [f.name for f in info.kind.fields]
    assert names == ["name", "source_id", "connected_at_ms", "last_seen_at_ms"]
    result = await query(reader, info.kind_id, 12)
    assert result.status is QueryStatus.ALIVE and result.source_set == 1 << 12
    name, source_id, connected_at, last_seen = codec.decode(result.data)
    assert (name, source_id) == ("game-7", 12) and last_seen >= connected_at > 0
    assert (await query(reader, info.kind_id, 0xFF)).status is QueryStatus.NOT_FOUND
    kinds = await reader.request(ListKinds())
    assert isinstance(kinds, KindList) and "convergedb_connections" in {
        k.kind.name for k in kinds.kinds
    }

    writer.send(Assert(info.kind_id, id_from_int(12), result.data))
    await writer.expect_async_error(ErrorCode.FORBIDDEN)
    mask, values = 1, b""
    writer.send(Patch(info.kind_id, id_from_int(12), mask, values))
    await writer.expect_async_error(ErrorCode.FORBIDDEN)

    await writer.close()

    async def gone() -> bool:
        return (await query(reader, info.kind_id, 12)).status is QueryStatus.TOMBSTONE

    await eventually(gone)
