"""The store's log and its checkpointer (storage.py, checkpoint.py).

A flush of in-memory kinds appends one log value; the checkpointer process moves log records
into the entity table; start-up replays what it had not moved. Shown on the real store, and on
a real server whose checkpointer is killed, whose log is left behind, and which is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import lmdb
import pytest

from convergedb import id_from_int
from convergedb.protocol import Assert, Batch, Query, QueryResult, Sync
from convergedb.server.storage import FlushWrite, Store, StoredKind, StoreError
from convergedb.server.table import Entity
from kinds import PLAYER, Player
from server_fixture import running_server
from test_admin import free_port, get
from test_server_recovery import register, snapshot, writer
from wire_client import WireClient

KIND = 7


def state(version: int, sources: int = 1, row: bytes = b"row") -> Entity:
    return Entity(row + bytes([version]), version, sources, version, 1, 0, 0)


def commit_flush(store: Store, seq: int, *states: tuple[int, Entity | None]) -> None:
    """Commit one flush of logged states (None: the entity is removed by compaction)."""
    write = FlushWrite(seq)
    for number, entity in states:
        eid = id_from_int(number)
        if entity is None:
            write.removed.append((KIND, eid, True))
        else:
            write.log_entity(KIND, eid, entity)
    store.commit(write)


def stored(store: Store) -> dict[bytes, Entity]:
    return dict(store.iter_entities(KIND))


def test_flushes_are_logged_then_checkpointed_in_order(tmp_path: Path) -> None:
    store = Store(tmp_path, fsync=False)
    commit_flush(store, 1, (1, state(1)), (2, state(1)))
    commit_flush(store, 2, (1, state(2)), (3, state(1)))
    commit_flush(store, 3, (2, None), (1, state(3, sources=3)))
    assert stored(store) == {}  # nothing in the entity table before a checkpoint
    assert store.log_backlog() == 3
    replayed = [(eid, entity) for _, eid, entity in store.replay_log()]
    assert replayed == [
        (id_from_int(1), state(1)),
        (id_from_int(2), state(1)),
        (id_from_int(1), state(2)),
        (id_from_int(3), state(1)),
        (id_from_int(1), state(3, sources=3)),
        (id_from_int(2), None),
    ]
    assert store.checkpoint(1) == 1  # a flush's value may be moved in several parts
    assert stored(store) == {id_from_int(1): state(1)}
    assert store.log_backlog() == 3
    assert [eid for _, eid, _ in store.replay_log()] == [id_from_int(n) for n in (2, 1, 3, 1, 2)]
    assert store.checkpoint(2) == 2  # the rest of the first flush, the start of the second
    assert stored(store) == {id_from_int(1): state(2), id_from_int(2): state(1)}
    assert store.log_backlog() == 2
    assert store.checkpoint(1000) == 3
    assert stored(store) == {id_from_int(1): state(3, sources=3), id_from_int(3): state(1)}
    assert store.log_backlog() == 0
    assert list(store.replay_log()) == []
    assert store.checkpoint(1000) == 0
    store.close()


def test_the_log_position_survives_reopening_after_a_checkpoint(tmp_path: Path) -> None:
    store = Store(tmp_path, fsync=False)
    commit_flush(store, 1, (1, state(1)))
    store.checkpoint(1000)
    store.close()
    store = Store(tmp_path, fsync=False)
    commit_flush(store, 2, (1, state(2)))
    assert [entity for _, _, entity in store.replay_log()] == [state(2)]
    store.checkpoint(1000)
    assert stored(store) == {id_from_int(1): state(2)}
    store.close()


def test_a_format_1_store_is_upgraded_and_an_unknown_format_refused(tmp_path: Path) -> None:
    Store(tmp_path / "old", fsync=False).close()
    Store(tmp_path / "future", fsync=False).close()
    for name, version in (("old", 1), ("future", 99)):
        env = lmdb.open(str(tmp_path / name / "store"), max_dbs=8)
        with env.begin(write=True) as txn:
            txn.put(b"format", version.to_bytes(4, "little"), db=env.open_db(b"meta", txn=txn))
        env.close()
    Store(tmp_path / "old", fsync=False).close()
    with pytest.raises(StoreError, match="format 99"):
        Store(tmp_path / "future", fsync=False)


# --- on a real server -----------------------------------------------------------------------


async def status(port: int) -> dict[str, object]:
    code, body = await get(port, "/v1/status")
    assert code == 200
    result: dict[str, object] = json.loads(body)
    return result


async def wait_for(port: int, check: str, predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        current = await status(port)
        if predicate(current[check]):  # type: ignore[operator]
            return
        assert time.monotonic() < deadline, f"{check} stayed {current[check]!r}"
        await asyncio.sleep(0.05)


async def write_round(client: WireClient, kind: int, round_: int, count: int) -> None:
    client.send(
        Batch(
            tuple(
                Assert(kind, id_from_int(i), PLAYER.encode(Player(f"p{i}", round_)))
                for i in range(count)
            )
        )
    )
    await client.request(Sync())


async def test_the_server_checkpoints_its_log_and_recovers_what_it_left(tmp_path: Path) -> None:
    port = free_port()
    async with running_server(tmp_path, "--admin-port", str(port)) as server:
        assert server.process is not None
        client = await writer(server, 1)
        kind = await register(client, PLAYER.definition)
        await write_round(client, kind, 1, 500)
        await wait_for(port, "log_backlog", lambda n: n == 0)
        first = await checkpointer(port)
        assert first["state"] == "running"

        # a dead checkpointer loses nothing: the log keeps growing, then a new one drains it
        os.kill(first["pid"], signal.SIGKILL)
        await write_round(client, kind, 2, 500)
        await wait_for(port, "checkpointer", lambda c: c["restarts"] == 1, timeout=10)
        await wait_for(port, "log_backlog", lambda n: n == 0)
        second = await checkpointer(port)
        assert second["state"] == "running" and second["pid"] != first["pid"]

        before = await snapshot(client, kind, range(500))
        await client.close()
        await server.kill()
        await server.start()
        reader = await writer(server, 2)
        assert await snapshot(reader, kind, range(500)) == before
        await reader.close()


async def test_start_up_replays_the_log_the_checkpointer_left(tmp_path: Path) -> None:
    store = Store(tmp_path / "data", fsync=False)
    definition = PLAYER.definition
    write = FlushWrite(2, kinds=[StoredKind(KIND, definition, (len(definition.fields),))])
    rows = {i: PLAYER.encode(Player(f"p{i}", i)) for i in range(10)}
    for i, row in rows.items():
        write.log_entity(KIND, id_from_int(i), Entity(row, 1, 2, 1, 1, 0, 0))
    store.commit(write)
    later = FlushWrite(3)
    later.log_entity(KIND, id_from_int(3), Entity(rows[4], 2, 2 | 4, 2, 1, 0, 0))
    store.commit(later)
    assert store.log_backlog() == 2 and stored(store) == {}
    store.close()
    async with running_server(tmp_path) as server:
        reader = await writer(server, 1)
        for i, row in rows.items():
            result = await reader.request(Query(KIND, id_from_int(i)))
            assert isinstance(result, QueryResult)
            expected = (2, 6, rows[4]) if i == 3 else (1, 2, row)
            assert (result.version, result.source_set, result.data) == expected
        await reader.close()


async def checkpointer(port: int) -> dict[str, int | str]:
    found: dict[str, int | str] = (await status(port))["checkpointer"]  # type: ignore[assignment]
    return found


async def test_an_orphaned_checkpointer_exits_when_the_server_is_killed(tmp_path: Path) -> None:
    port = free_port()
    async with running_server(tmp_path, "--admin-port", str(port)) as server:
        pid = (await checkpointer(port))["pid"]
        assert isinstance(pid, int)
        await server.kill()
    deadline = time.monotonic() + 30
    while _is_running(pid):
        assert time.monotonic() < deadline, "the checkpointer outlived its server"
        await asyncio.sleep(0.05)


def _is_running(pid: int) -> bool:
    """False once the process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"
