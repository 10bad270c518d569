"""Durability and recovery (SPEC §5, §9): restarts, crashes under load, disk-backed kinds."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import replace

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    Batch,
    ConnectMode,
    CreateKind,
    KindInfo,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
)
from kinds import PLAYER, Player
from server_fixture import ServerProcess
from wire_client import WireClient

DISK_PLAYER = replace(PLAYER.definition, name="disk_player", disk_backed=True)


async def writer(server: ServerProcess, source_id: int) -> WireClient:
    client = await WireClient.open(server.host, server.port)
    await client.connect(ConnectMode.CLAIM, source_id=source_id)
    return client


async def register(client: WireClient, definition: object) -> int:
    reply = await client.request(CreateKind(definition))  # type: ignore[arg-type]
    assert isinstance(reply, KindInfo), reply
    return reply.kind_id


async def snapshot(client: WireClient, kind: int, ids: range) -> list[tuple[object, ...]]:
    states = []
    for i in ids:
        result = await client.request(Query(kind, id_from_int(i)))
        assert isinstance(result, QueryResult)
        states.append((result.status, result.version, result.source_set, result.data))
    return states


async def test_a_restart_keeps_every_entity_identical(server: ServerProcess) -> None:
    a, b = await writer(server, 1), await writer(server, 2)
    memory = await register(a, PLAYER.definition)
    disk = await register(a, DISK_PLAYER)
    for kind in (memory, disk):
        a.send(
            Batch(
                tuple(
                    Assert(kind, id_from_int(i), PLAYER.encode(Player(f"p{i}", i)))
                    for i in range(60)
                )
            )
        )
        await a.sync()
        b.send(
            Batch(
                tuple(
                    Assert(kind, id_from_int(i), PLAYER.encode(Player(f"q{i}", i)))
                    for i in range(40, 80)
                )
            )
        )
        a.send(Batch(tuple(Retract(kind, id_from_int(i)) for i in range(0, 20))))
        await b.sync()
        await a.sync()
    before = {kind: await snapshot(a, kind, range(90)) for kind in (memory, disk)}
    statuses = {state[0] for state in before[memory]}
    assert statuses == {QueryStatus.ALIVE, QueryStatus.TOMBSTONE, QueryStatus.NOT_FOUND}
    assert before[memory] == before[disk]
    seq = await a.sync()
    await a.close()
    await b.close()

    await server.restart()
    reader = await WireClient.open(server.host, server.port)
    await reader.connect(ConnectMode.READ_ONLY)
    for kind in (memory, disk):
        assert await snapshot(reader, kind, range(90)) == before[kind]
    assert await reader.sync() == seq  # the seq continues where it was


async def test_sigkill_under_load_keeps_every_write_confirmed_by_sync(
    server: ServerProcess,
) -> None:
    setup = await writer(server, 0)
    kinds = [await register(setup, PLAYER.definition), await register(setup, DISK_PLAYER)]
    await setup.close()
    confirmed: dict[tuple[int, int], int] = {}
    rng = random.Random(7)

    async def write_forever(source_id: int) -> None:
        client = await writer(server, source_id)
        round_number = 0
        with contextlib.suppress(ConnectionError, OSError, TimeoutError, AssertionError):
            while True:
                round_number += 1
                sent = {}
                ops = []
                for _ in range(50):
                    kind = rng.choice(kinds)
                    entity = source_id * 1000 + rng.randrange(100)
                    ops.append(
                        Assert(
                            kind,
                            id_from_int(entity),
                            PLAYER.encode(Player("w", round_number % 60000)),
                        )
                    )
                    sent[(kind, entity)] = round_number % 60000
                client.send(Batch(tuple(ops)))
                await client.sync()
                confirmed.update(sent)

    tasks = [asyncio.create_task(write_forever(source)) for source in (1, 2, 3)]
    await asyncio.sleep(0)  # let them start
    while len(confirmed) < 200:
        await asyncio.sleep(0.05)
    await server.kill()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    survivors = dict(confirmed)

    await server.start()
    reader = await WireClient.open(server.host, server.port)
    await reader.connect(ConnectMode.READ_ONLY)
    for (kind, entity), hp in survivors.items():
        result = await reader.request(Query(kind, id_from_int(entity)))
        assert isinstance(result, QueryResult) and result.status is QueryStatus.ALIVE
        stored = PLAYER.decode(result.data).hp
        # each writer's values for an entity only grow, so the stored one is the confirmed one
        # or a later one that was flushed before the kill
        assert stored >= hp, (kind, entity, stored, hp)
