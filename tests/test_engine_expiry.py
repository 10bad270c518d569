"""The bulk retractions of a dead source against the general path (`held_by` then
`retract_many`): `Engine.retract_everywhere` (same committed states, same count, whatever the
window and the flush in flight hold), and `Engine.expire`, prepared in slices while regular
flushes commit writes that change the entities it is computing (the same committed states,
counts and notified changes as the general path applied at the flush that commits it, and the
same again after a restart). Run on real engines over real stores, side by side."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from convergedb import id_from_int
from convergedb.protocol.codes import DeleteCause
from convergedb.schema.patch import encode_patch
from convergedb.server.catalog import Catalog, KindState
from convergedb.server.engine import EXPIRY_SEQ_GAP, Change, ChangeKind, Engine
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
        elif op == "patch":
            mask, values = encode_patch(kind.codec, {1: version + i % 7})
            engine.write_patch(kind, eid, mask, values, bit, b"")
        else:
            engine.write_retract(kind, eid, bit, b"")


def random_writes(
    rng: random.Random, count: int, version: int, sources: tuple[int, ...] = (DEAD, OTHER)
) -> list[tuple[str, int, int, int]]:
    return [
        (
            rng.choices(("assert", "patch", "retract"), (7, 1, 2))[0],
            rng.randrange(ENTITIES),
            rng.choice(sources),
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


def listen(engine: Engine) -> list[tuple[int, list[Change]]]:
    flushes: list[tuple[int, list[Change]]] = []
    engine.commit_listeners.append(lambda seq, changes: flushes.append((seq, list(changes))))
    return flushes


def notified(changes: list[Change]) -> set[tuple[bytes, int, int, int, bytes | None]]:
    return {(c.eid, c.change, c.entity.version, c.entity.sources, c.previous) for c in changes}


async def expiry_scenario(
    engine: Engine, kind: KindState, seed: int, expire_at: int | None
) -> int | None:
    """Committed history, a flush in flight and a window with the dead source's writes; then
    flushes of the other source's writes (assert, patch, retract of the same entities).

    With `expire_at` None, `Engine.expire` runs right after the window, in small slices, and
    this returns the number of the flush that committed it. Otherwise the general path
    retracts the dead source just before flush number `expire_at`."""
    rng = random.Random(seed)
    apply(engine, kind, random_writes(rng, 600, 1))
    await engine.flush()
    apply(engine, kind, random_writes(rng, 200, 2))
    in_flight = asyncio.ensure_future(engine.flush())
    await asyncio.sleep(0)
    assert engine._in_flight, "the flush should be committing"
    apply(engine, kind, random_writes(rng, 200, 3))
    if expire_at is None:
        engine.expiry_slice = 16
        engine.expire(DEAD, DeleteCause.LIVENESS)
        assert engine._expiry is not None
        reserved = engine._expiry.seq  # ahead of the flush in flight too
        assert reserved == engine.seq + 1 + EXPIRY_SEQ_GAP
    await in_flight
    for number in range(12):
        apply(engine, kind, random_writes(rng, 30, 4 + number, (OTHER,)))
        for _ in range(rng.randrange(8)):
            await asyncio.sleep(0)  # a slice of the expiry, perhaps
        if number == expire_at:
            engine.retract_many(engine.held_by(DEAD, system=True), DEAD, DeleteCause.LIVENESS)
        before = engine.seq
        await engine.flush()
        if expire_at is None and engine.seq == reserved:
            assert engine._expiry is None
            return number
        if number == expire_at:
            return number
        assert engine.seq < reserved if expire_at is None else True
        assert engine.seq >= before
    assert expire_at is not None, "the expiry should have committed within 12 flushes"
    return None


async def test_an_expiry_prepared_beside_flushes_matches_the_general_path(
    tmp_path: Path,
) -> None:
    for seed in range(12):
        prepared, prepared_kind = make_engine(tmp_path / f"prepared{seed}")
        general, general_kind = make_engine(tmp_path / f"general{seed}")
        prepared_flushes, general_flushes = listen(prepared), listen(general)
        committed_at = await expiry_scenario(prepared, prepared_kind, seed, None)
        assert committed_at is not None
        await expiry_scenario(general, general_kind, seed, committed_at)
        assert committed(prepared_kind) == committed(general_kind)
        assert not any(e.sources & DEAD for e in prepared_kind.entities.values())  # type: ignore[union-attr]
        assert (prepared_kind.alive, prepared_kind.tombstones) == (
            general_kind.alive,
            general_kind.tombstones,
        )
        # the same changes, flush by flush; seqs increase in commit order (the expiry's
        # flush is numbered ahead, by the gap it reserved)
        assert len(prepared_flushes) == len(general_flushes)
        for (seq, changes), (_, expected) in zip(prepared_flushes, general_flushes, strict=True):
            assert notified(changes) == notified(expected)
            assert all(c.entity.seq == seq for c in changes)
        seqs = [seq for seq, _ in prepared_flushes]
        assert seqs == sorted(seqs) and seqs[-1] - seqs[-2] > EXPIRY_SEQ_GAP // 2
        assert any(c.entity.cause == DeleteCause.LIVENESS for c in prepared_flushes[-1][1])
        # what it committed is what a restart reads back (log records computed again win)
        state = committed(prepared_kind)
        await prepared.close()
        prepared.store.close()
        reopened, reopened_kind = make_engine(tmp_path / f"prepared{seed}")
        assert committed(reopened_kind) == state
        assert reopened.seq == seqs[-1]
        for engine in (reopened, general):
            await engine.close()
            engine.store.close()


async def test_a_source_reclaimed_while_its_expiry_is_prepared_keeps_its_new_writes(
    tmp_path: Path,
) -> None:
    """A reconnection after the deadline: the expiry comes first, then the new writes."""
    engine, kind = make_engine(tmp_path / "reclaimed")
    rng = random.Random(7)
    apply(engine, kind, random_writes(rng, 600, 1))
    await engine.flush()
    engine.expiry_slice = 16
    engine.expire(DEAD, DeleteCause.LIVENESS)
    for _ in range(10):
        await asyncio.sleep(0)  # some slices
    assert engine._expiry is not None and not engine._expiry.ready
    engine.source_reused(DEAD)
    assert engine._expiry is None
    rewritten = {i for op, i, _, _ in [("assert", i, DEAD, 9) for i in range(0, ENTITIES, 3)]}
    apply(engine, kind, [("assert", i, DEAD, 9) for i in sorted(rewritten)])
    await engine.flush()
    for _ in range(50):
        await asyncio.sleep(0)  # a preparation that did not stop would finish here
    await engine.flush()
    assert kind.entities is not None
    held = {
        i for i in range(ENTITIES) if (e := kind.entities.get(id_from_int(i))) and e.sources & DEAD
    }
    assert held == rewritten
    for i in rewritten:
        assert kind.entities[id_from_int(i)].row == row(i, 9)
    await engine.close()
    engine.store.close()


async def test_an_expiry_that_begins_while_another_commits_is_numbered_after_it(
    tmp_path: Path,
) -> None:
    """Two sources die close together: the second expiry reserves its seq while the first one
    commits. Seqs stay unique and increasing, in commit order, across a restart too."""
    third = 1 << 3
    engine, kind = make_engine(tmp_path / "two")
    flushes = listen(engine)
    for i in range(100):
        engine.write_assert(kind, id_from_int(i), row(i, 1), DEAD, b"")
        engine.write_assert(kind, id_from_int(1000 + i), row(i, 1), third, b"")
    await engine.flush()
    engine.expiry_slice = 16
    engine.expire(DEAD, DeleteCause.LIVENESS)
    while engine._expiry is not None and not engine._expiry.ready:
        await asyncio.sleep(0)
    first = asyncio.ensure_future(engine.flush())  # commits the first expiry
    await asyncio.sleep(0)
    assert engine._flushing and engine._expiry is None
    engine.expire(third, DeleteCause.LIVENESS)  # the second source dies meanwhile
    await first
    for n in range(3):  # regular flushes while the second is prepared
        engine.write_assert(kind, id_from_int(5000 + n), row(n, 1), OTHER, b"")
        await engine.flush()
    while engine._expiry is not None and not engine._expiry.ready:
        await asyncio.sleep(0)
    await engine.flush()  # commits the second expiry
    seqs = [seq for seq, _ in flushes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) == 6
    assert kind.entities is not None
    assert not any(e.sources & (DEAD | third) for e in kind.entities.values())
    last = engine.seq
    assert last == seqs[-1]
    await engine.close()
    engine.store.close()
    reopened, _ = make_engine(tmp_path / "two")
    assert reopened.seq == last
    await reopened.close()
    reopened.store.close()


async def test_an_expiry_whose_reserved_seqs_run_out_retracts_through_the_accumulator(
    tmp_path: Path,
) -> None:
    """The flushes that commit while an expiry is prepared take the seqs below the one it
    reserved; should they use them all up, the expiry is retracted in the next flush instead.
    (2^20 in a server: a few here.)"""
    engine, kind = make_engine(tmp_path / "gap")
    flushes = listen(engine)
    for i in range(400):
        engine.write_assert(kind, id_from_int(i), row(i, 1), DEAD, b"")
    await engine.flush()
    engine.expiry_seq_gap = 3
    engine.expiry_slice = 4
    engine.expire(DEAD, DeleteCause.LIVENESS)
    reserved = engine.seq + 3
    for n in range(4):  # regular flushes, the preparation far from done
        expiry = engine._expiry
        assert (expiry is not None and not expiry.ready) if n < 3 else expiry is None
        engine.write_assert(kind, id_from_int(5000 + n), row(n, 1), OTHER, b"")
        await engine.flush()
    seqs = [seq for seq, _ in flushes]
    deaths = [seq for seq, changes in flushes for c in changes if c.change == ChangeKind.DELETED]
    assert deaths == [reserved] * 400  # the third flush, through the accumulator
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert kind.entities is not None
    assert not any(e.sources & DEAD for e in kind.entities.values())
    assert kind.alive == 4 and kind.tombstones == 400
    await engine.close()
    engine.store.close()
