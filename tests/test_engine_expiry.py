"""The bulk retraction of a dead source (`Engine.retract_everywhere`) against the general path
(`held_by` then `retract_many`): same committed states, same count, whatever the window and the
flush in flight hold. Run on two real engines over real stores, side by side."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from convergedb import id_from_int
from convergedb.protocol.codes import DeleteCause
from convergedb.server.catalog import Catalog, KindState
from convergedb.server.engine import Engine
from convergedb.server.storage import Store
from kinds import PLAYER, Player

DEAD = 1 << 1
OTHER = 1 << 2
ENTITIES = 300


def row(i: int, version: int) -> bytes:
    return PLAYER.encode(Player(f"p{i}", version))


def make_engine(directory: Path) -> tuple[Engine, KindState]:
    catalog = Catalog()
    engine = Engine(catalog, Store(directory, fsync=False), window_ms=20)
    engine.load()
    kind, _ = catalog.register(PLAYER.definition)
    kind.watchers = 1  # changes are built as for a watched kind
    engine.kind_changed(kind, None)
    return engine, kind


def apply(engine: Engine, kind: KindState, writes: list[tuple[str, int, int, int]]) -> None:
    for op, i, bit, version in writes:
        eid = id_from_int(i)
        if op == "assert":
            engine.write_assert(kind, eid, row(i, version), bit, b"")
        else:
            engine.write_retract(kind, eid, bit, b"")


def random_writes(rng: random.Random, count: int, version: int) -> list[tuple[str, int, int, int]]:
    return [
        (
            "retract" if rng.random() < 0.2 else "assert",
            rng.randrange(ENTITIES),
            rng.choice((DEAD, OTHER)),
            version,
        )
        for _ in range(count)
    ]


async def scenario(engine: Engine, kind: KindState, seed: int, bulk: bool) -> int:
    """Committed history, a flush in flight, a window of pending writes, then the expiry."""
    rng = random.Random(seed)
    apply(engine, kind, random_writes(rng, 600, 1))
    await engine.flush()
    apply(engine, kind, random_writes(rng, 200, 2))
    in_flight = asyncio.ensure_future(engine.flush())
    await asyncio.sleep(0)  # the flush computed its changes and now awaits its commit
    assert engine._in_flight, "the flush should be committing"
    apply(engine, kind, random_writes(rng, 200, 3))
    if bulk:
        count = engine.retract_everywhere(DEAD, DeleteCause.LIVENESS, system=True)
    else:
        held = engine.held_by(DEAD, system=True)
        count = engine.retract_many(held, DEAD, DeleteCause.LIVENESS)
    await in_flight
    await engine.flush()
    return count


def committed(kind: KindState) -> dict[bytes, tuple[bytes, int, int, int]]:
    assert kind.entities is not None
    return {eid: (e.row, e.version, e.sources, e.cause) for eid, e in sorted(kind.entities.items())}


async def test_the_bulk_expiry_matches_the_general_path(tmp_path: Path) -> None:
    for seed in range(5):
        general, general_kind = make_engine(tmp_path / f"general{seed}")
        bulk, bulk_kind = make_engine(tmp_path / f"bulk{seed}")
        expected = await scenario(general, general_kind, seed, bulk=False)
        got = await scenario(bulk, bulk_kind, seed, bulk=True)
        assert got == expected > 0
        assert committed(bulk_kind) == committed(general_kind)
        assert not any(e.sources & DEAD for e in bulk_kind.entities.values())  # type: ignore[union-attr]
        assert (bulk_kind.alive, bulk_kind.tombstones) == (
            general_kind.alive,
            general_kind.tombstones,
        )
        for engine in (general, bulk):
            await engine.close()
            engine.store.close()
