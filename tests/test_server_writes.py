"""The three writes and coalescing (SPEC §4, §5), over real TCP against a real server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    Batch,
    ConnectMode,
    CreateKind,
    KindInfo,
    Patch,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
)
from kinds import MATCH, PLAYER, Match, Player, Vec2
from server_fixture import ServerProcess, running_server
from wire_client import WireClient

E1, E2, E3 = id_from_int(1), id_from_int(2), id_from_int(3)


async def register(client: WireClient, definition: object) -> int:
    reply = await client.request(CreateKind(definition))  # type: ignore[arg-type]
    assert isinstance(reply, KindInfo), reply
    return reply.kind_id


async def query(client: WireClient, kind_id: int, eid: bytes) -> QueryResult:
    reply = await client.request(Query(kind_id, eid))
    assert isinstance(reply, QueryResult), reply
    return reply


@pytest.fixture
async def writer(server: ServerProcess) -> AsyncIterator[WireClient]:
    client = await WireClient.open(server.host, server.port)
    await client.connect(ConnectMode.CLAIM, source_id=1)
    yield client
    await client.close()


@pytest.fixture
async def other(server: ServerProcess) -> AsyncIterator[WireClient]:
    client = await WireClient.open(server.host, server.port)
    await client.connect(ConnectMode.CLAIM, source_id=2)
    yield client
    await client.close()


def row(**fields: object) -> bytes:
    return PLAYER.encode(Player(**fields))  # type: ignore[arg-type]


async def test_assert_creates_at_version_1_then_changes_bump_the_version(
    writer: WireClient,
) -> None:
    kind = await register(writer, PLAYER.definition)
    seq0 = await writer.sync()
    writer.send(Assert(kind, E1, row(name="ana", hp=10)))
    seq1 = await writer.sync()
    result = await query(writer, kind, E1)
    assert result.status is QueryStatus.ALIVE
    assert (result.version, result.source_set) == (1, 1 << 1)
    assert PLAYER.decode(result.data) == Player(name="ana", hp=10)
    assert seq1 == seq0 + 1

    writer.send(Assert(kind, E1, row(name="ana", hp=9)))
    seq2 = await writer.sync()
    result = await query(writer, kind, E1)
    assert result.version == 2 and PLAYER.decode(result.data).hp == 9
    assert seq2 == seq1 + 1


async def test_identical_reassert_changes_nothing(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="bob")))
    seq = await writer.sync()
    for _ in range(3):
        writer.send(Assert(kind, E1, row(name="bob")))
        assert await writer.sync() == seq  # no flush committed a change
    assert (await query(writer, kind, E1)).version == 1


async def test_patch_keeps_the_other_fields(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="cy", hp=5, pos=Vec2(1, 2), items=[7])))
    mask, values = PLAYER.patch({"hp": 6})
    writer.send(Patch(kind, E1, mask, values))
    await writer.sync()
    result = await query(writer, kind, E1)
    assert PLAYER.decode(result.data) == Player(name="cy", hp=6, pos=Vec2(1, 2), items=[7])
    assert result.version == 2 or result.version == 1  # same window or the next


async def test_patch_creates_a_missing_entity_with_zero_values(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    mask, values = PLAYER.patch({"alive": True, "items": [1, 2]})
    writer.send(Patch(kind, E2, mask, values))
    await writer.sync()
    result = await query(writer, kind, E2)
    assert result.status is QueryStatus.ALIVE and result.version == 1
    assert PLAYER.decode(result.data) == Player(alive=True, items=[1, 2])


async def test_a_field_can_be_patched_to_zero(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="dee", hp=50)))
    await writer.sync()
    mask, values = PLAYER.patch({"hp": 0, "name": ""})
    writer.send(Patch(kind, E1, mask, values))
    await writer.sync()
    result = await query(writer, kind, E1)
    assert PLAYER.decode(result.data) == Player() and result.version == 2


async def test_retract_with_another_source_left_keeps_the_entity(
    writer: WireClient, other: WireClient
) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="eve", hp=1)))
    await writer.sync()
    mask, values = PLAYER.patch({"hp": 2})
    other.send(Patch(kind, E1, mask, values))
    await other.sync()
    result = await query(writer, kind, E1)
    assert result.source_set == (1 << 1) | (1 << 2) and result.version == 2

    seq = await writer.sync()
    writer.send(Retract(kind, E1))
    assert await writer.sync() == seq  # the source set alone changed: no new seq
    result = await query(writer, kind, E1)
    assert result.status is QueryStatus.ALIVE
    assert result.source_set == 1 << 2 and result.version == 2
    assert PLAYER.decode(result.data) == Player(name="eve", hp=2)


async def test_retract_by_the_last_source_makes_a_tombstone(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="fay")))
    await writer.sync()
    writer.send(Retract(kind, E1))
    await writer.sync()
    result = await query(writer, kind, E1)
    assert (result.status, result.version, result.source_set, result.data) == (
        QueryStatus.TOMBSTONE, 2, 0, b""
    )  # fmt: skip
    # re-created from its tombstone: the version keeps counting
    writer.send(Assert(kind, E1, row(name="fay", hp=3)))
    await writer.sync()
    result = await query(writer, kind, E1)
    assert result.status is QueryStatus.ALIVE and result.version == 3


async def test_retracting_what_the_source_does_not_assert_is_a_no_op(
    writer: WireClient, other: WireClient
) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="gus")))
    seq = await writer.sync()
    other.send(Retract(kind, E1))
    other.send(Retract(kind, E3))
    assert await other.sync() == seq
    assert (await query(other, kind, E1)).source_set == 1 << 1
    assert (await query(other, kind, E3)).status is QueryStatus.NOT_FOUND


async def test_many_writes_in_one_window_make_one_version(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="hal", hp=0)))
    seq = await writer.sync()
    writer.send(Batch(tuple(Assert(kind, E1, row(name="hal", hp=hp)) for hp in range(1, 50))))
    assert await writer.sync() == seq + 1
    result = await query(writer, kind, E1)
    assert result.version == 2 and PLAYER.decode(result.data).hp == 49


async def test_assert_then_retract_of_a_new_entity_in_one_window_leaves_nothing(
    writer: WireClient,
) -> None:
    kind = await register(writer, PLAYER.definition)
    seq = await writer.sync()
    writer.send(Batch((Assert(kind, E3, row(name="ivy")), Retract(kind, E3))))
    assert await writer.sync() == seq
    assert (await query(writer, kind, E3)).status is QueryStatus.NOT_FOUND


async def test_batch_sub_operations_apply_in_order_across_kinds(writer: WireClient) -> None:
    players = await register(writer, PLAYER.definition)
    matches = await register(writer, MATCH.definition)
    hp_mask, hp_values = PLAYER.patch({"hp": 77})
    writer.send(
        Batch(
            (
                Assert(players, E1, row(name="jo", hp=1)),
                Patch(players, E1, hp_mask, hp_values),
                Assert(matches, E1, MATCH.encode(Match("dust", 2))),
                Assert(players, E2, row(name="kim")),
                Retract(players, E2),
                Assert(players, E2, row(name="kim", hp=5)),
            )
        )
    )
    await writer.sync()
    assert PLAYER.decode((await query(writer, players, E1)).data) == Player(name="jo", hp=77)
    assert PLAYER.decode((await query(writer, players, E2)).data) == Player(name="kim", hp=5)
    assert MATCH.decode((await query(writer, matches, E1)).data) == Match("dust", 2)


async def test_patch_on_a_tombstone_starts_from_zero(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="lee", hp=9)))
    await writer.sync()
    writer.send(Retract(kind, E1))
    await writer.sync()
    mask, values = PLAYER.patch({"alive": True})
    writer.send(Patch(kind, E1, mask, values))
    await writer.sync()
    result = await query(writer, kind, E1)
    assert PLAYER.decode(result.data) == Player(alive=True) and result.version == 3


async def test_retract_then_patch_in_one_window_restarts_from_zero(writer: WireClient) -> None:
    kind = await register(writer, PLAYER.definition)
    writer.send(Assert(kind, E1, row(name="max", hp=9)))
    await writer.sync()
    mask, values = PLAYER.patch({"hp": 1})
    writer.send(Batch((Retract(kind, E1), Patch(kind, E1, mask, values))))
    await writer.sync()
    result = await query(writer, kind, E1)
    assert PLAYER.decode(result.data) == Player(hp=1) and result.version == 2


async def test_reads_see_only_committed_state(tmp_path: Path) -> None:
    # a long window: the kind's flush has just run, so the next one is two seconds away and
    # the write is still pending when the query arrives
    async with running_server(tmp_path, "--window-ms", "2000") as slow:
        client = await WireClient.open(slow.host, slow.port)
        await client.connect(ConnectMode.CLAIM, source_id=3)
        kind = await register(client, PLAYER.definition)
        client.send(Assert(kind, E1, row(name="ned")))
        assert (await query(client, kind, E1)).status is QueryStatus.NOT_FOUND
        await client.sync()
        assert (await query(client, kind, E1)).status is QueryStatus.ALIVE
        await client.close()
