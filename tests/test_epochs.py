"""Source epochs (SPEC §7): reconciling a writer's new snapshot with what it asserted before."""

from __future__ import annotations

from dataclasses import replace

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    Batch,
    ConnectMode,
    CreateKind,
    EpochBegin,
    EpochEnd,
    Error,
    ErrorCode,
    KindInfo,
    Ok,
    Patch,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
)
from kinds import PLAYER, Player
from server_fixture import ServerProcess
from wire_client import WireClient

ROW = PLAYER.encode(Player(name="snap"))


async def writer(server: ServerProcess, source_id: int) -> WireClient:
    c = await WireClient.open(server.host, server.port)
    await c.connect(ConnectMode.CLAIM, source_id=source_id)
    return c


async def kinds(c: WireClient, count: int) -> list[int]:
    ids = []
    for i in range(count):
        info = await c.request(CreateKind(replace(PLAYER.definition, name=f"k{i}")))
        assert isinstance(info, KindInfo)
        ids.append(info.kind_id)
    return ids


async def ok(c: WireClient, request: object) -> int:
    reply = await c.request(request)  # type: ignore[arg-type]
    assert isinstance(reply, Ok), reply
    return reply.value


async def status(c: WireClient, kind: int, entity: int) -> QueryResult:
    result = await c.request(Query(kind, id_from_int(entity)))
    assert isinstance(result, QueryResult)
    return result


async def test_an_epoch_retracts_exactly_what_was_not_reasserted(server: ServerProcess) -> None:
    w = await writer(server, 1)
    other = await writer(server, 2)
    kind_ids = await kinds(w, 3)
    everything = [(k, i) for k in kind_ids for i in range(10_000 // 3 + 1)][:10_000]
    for start in range(0, len(everything), 1000):
        w.send(
            Batch(
                tuple(Assert(k, id_from_int(i), ROW) for k, i in everything[start : start + 1000])
            )
        )
    await w.sync()
    shared = everything[9_990:]  # the other source holds 10 of the entities that will go stale
    other.send(Batch(tuple(Assert(k, id_from_int(i), ROW) for k, i in shared)))
    await other.sync()

    assert await ok(w, EpochBegin()) == 10_000
    kept, stale = everything[:9_500], everything[9_500:]
    new_row = PLAYER.encode(Player(name="snap", hp=1))
    for start in range(0, len(kept), 700):  # several batches, several flushes
        w.send(
            Batch(tuple(Assert(k, id_from_int(i), new_row) for k, i in kept[start : start + 700]))
        )
        await w.sync()
    assert await ok(w, EpochEnd()) == 500
    await w.sync()

    for k, i in kept[::97]:
        assert (await status(w, k, i)).status is QueryStatus.ALIVE
    for k, i in stale:
        result = await status(w, k, i)
        if (k, i) in shared:
            assert (result.status, result.source_set) == (QueryStatus.ALIVE, 1 << 2)
        else:
            assert result.status is QueryStatus.TOMBSTONE


async def test_explicit_retracts_and_new_entities_during_an_epoch(server: ServerProcess) -> None:
    w = await writer(server, 1)
    (kind,) = await kinds(w, 1)
    w.send(Batch(tuple(Assert(kind, id_from_int(i), ROW) for i in range(5))))
    await w.sync()
    assert await ok(w, EpochBegin()) == 5
    w.send(Retract(kind, id_from_int(0)))  # explicit: not counted
    mask, values = PLAYER.patch({"hp": 3})
    w.send(Patch(kind, id_from_int(1), mask, values))  # a patch re-asserts
    w.send(Assert(kind, id_from_int(9), ROW))  # new during the epoch
    assert await ok(w, EpochEnd()) == 3  # 2, 3, 4
    await w.sync()
    expected = {0: QueryStatus.TOMBSTONE, 1: QueryStatus.ALIVE, 2: QueryStatus.TOMBSTONE,
                9: QueryStatus.ALIVE}  # fmt: skip
    for entity, want in expected.items():
        assert (await status(w, kind, entity)).status is want


async def test_the_baseline_counts_writes_sent_before_the_begin(server: ServerProcess) -> None:
    w = await writer(server, 1)
    (kind,) = await kinds(w, 1)
    w.send(Assert(kind, id_from_int(1), ROW))  # not yet flushed when EPOCH_BEGIN arrives
    assert await ok(w, EpochBegin()) == 1
    assert await ok(w, EpochEnd()) == 1


async def test_a_second_begin_starts_afresh(server: ServerProcess) -> None:
    w = await writer(server, 1)
    (kind,) = await kinds(w, 1)
    w.send(Batch(tuple(Assert(kind, id_from_int(i), ROW) for i in range(4))))
    assert await ok(w, EpochBegin()) == 4
    w.send(Batch(tuple(Assert(kind, id_from_int(i), ROW) for i in range(2))))
    assert await ok(w, EpochBegin()) == 4  # the re-assertions of the first epoch are forgotten
    w.send(Assert(kind, id_from_int(3), ROW))
    assert await ok(w, EpochEnd()) == 3


async def test_end_without_begin_and_read_only(server: ServerProcess) -> None:
    w = await writer(server, 1)
    reply = await w.request(EpochEnd())
    assert isinstance(reply, Error) and reply.code == ErrorCode.EPOCH_NOT_OPEN
    reader = await WireClient.open(server.host, server.port)
    await reader.connect(ConnectMode.READ_ONLY)
    for request in (EpochBegin(), EpochEnd()):
        reply = await reader.request(request)
        assert isinstance(reply, Error) and reply.code == ErrorCode.READ_ONLY


async def test_an_epoch_open_at_disconnect_is_discarded(server: ServerProcess) -> None:
    w = await writer(server, 1)
    (kind,) = await kinds(w, 1)
    w.send(Batch(tuple(Assert(kind, id_from_int(i), ROW) for i in range(3))))
    assert await ok(w, EpochBegin()) == 3
    await w.close()
    back = await writer(server, 1)  # reclaimed within its grace period
    await back.sync()  # its presence is written after the old connection's batch
    reply = await back.request(EpochEnd())
    assert isinstance(reply, Error) and reply.code == ErrorCode.EPOCH_NOT_OPEN
    for i in range(3):
        assert (await status(back, kind, i)).status is QueryStatus.ALIVE


async def test_system_kinds_are_not_in_the_baseline(server: ServerProcess) -> None:
    w = await writer(server, 1)  # its presence entity holds its bit
    assert await ok(w, EpochBegin()) == 0
    assert await ok(w, EpochEnd()) == 0
