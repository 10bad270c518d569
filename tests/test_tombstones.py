"""Tombstones, retention and compaction (SPEC §2, §9)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    ConnectMode,
    CreateKind,
    KindInfo,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
)
from kinds import PLAYER, Player
from server_fixture import running_server
from wire_client import WireClient

ROW = PLAYER.encode(Player(name="t"))


async def status(c: WireClient, kind: int, entity: int) -> QueryResult:
    result = await c.request(Query(kind, id_from_int(entity)))
    assert isinstance(result, QueryResult)
    return result


async def wait_compacted(c: WireClient, kind: int, entity: int, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while (await status(c, kind, entity)).status is not QueryStatus.NOT_FOUND:
        assert time.monotonic() - started < timeout, "the tombstone was never compacted"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_a_tombstone_is_visible_for_the_retention_then_gone(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--tombstone-retention", "0.8") as server:
        c = await WireClient.open(server.host, server.port)
        await c.connect(ConnectMode.CLAIM, source_id=1)
        info = await c.request(CreateKind(PLAYER.definition))
        assert isinstance(info, KindInfo)
        kind = info.kind_id
        c.send(Assert(kind, id_from_int(1), ROW))
        await c.sync()
        c.send(Retract(kind, id_from_int(1)))
        await c.sync()
        died = time.monotonic()
        tombstone = await status(c, kind, 1)
        assert (tombstone.status, tombstone.version) == (QueryStatus.TOMBSTONE, 2)
        await wait_compacted(c, kind, 1)
        assert time.monotonic() - died >= 0.8 - 0.05  # not before the retention (clock slack)
        # created again after compaction: the version starts again at 1
        c.send(Assert(kind, id_from_int(1), ROW))
        await c.sync()
        assert (await status(c, kind, 1)).version == 1


async def test_tombstones_are_compacted_after_a_restart_too(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--tombstone-retention", "1.5") as server:
        c = await WireClient.open(server.host, server.port)
        await c.connect(ConnectMode.CLAIM, source_id=1)
        info = await c.request(CreateKind(PLAYER.definition))
        assert isinstance(info, KindInfo)
        for i in range(50):
            c.send(Assert(info.kind_id, id_from_int(i), ROW))
        await c.sync()
        for i in range(50):
            c.send(Retract(info.kind_id, id_from_int(i)))
        await c.sync()
        await c.close()
        await server.restart()
        r = await WireClient.open(server.host, server.port)
        await r.connect(ConnectMode.READ_ONLY)
        assert (await status(r, info.kind_id, 49)).status is QueryStatus.TOMBSTONE
        await wait_compacted(r, info.kind_id, 49)
        for i in range(50):
            assert (await status(r, info.kind_id, i)).status is QueryStatus.NOT_FOUND
        await server.restart()  # the removal was durable
        r = await WireClient.open(server.host, server.port)
        await r.connect(ConnectMode.READ_ONLY)
        assert (await status(r, info.kind_id, 0)).status is QueryStatus.NOT_FOUND
