"""The engine's notifier: a listener that fails on one flush does not stop the notifications of
the next ones (real engine over a real store, its flush loop and notifier running)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from convergedb import id_from_int
from convergedb.server.catalog import Catalog, KindState
from convergedb.server.engine import Change, Engine
from convergedb.server.storage import Store
from kinds import PLAYER, Player

WRITER = 1 << 1


def watched_engine(directory: Path) -> tuple[Engine, KindState]:
    """An engine over a real store with one kind, watched (its changes are built)."""
    catalog = Catalog()
    engine = Engine(catalog, Store(directory, fsync=False), window_ms=5)
    engine.load()
    kind, _ = catalog.register(PLAYER.definition)
    kind.watchers = 1
    engine.kind_changed(kind, None)
    return engine, kind


async def test_a_failing_listener_does_not_stop_the_notifications(tmp_path: Path) -> None:
    engine, kind = watched_engine(tmp_path)
    seen: list[bytes] = []

    def listener(seq: int, changes: list[Change]) -> None:
        seen.extend(c.eid for c in changes)
        if any(c.eid == id_from_int(1) for c in changes):
            raise RuntimeError("a bug in a listener")

    engine.commit_listeners.append(listener)
    engine.start()
    try:
        for i in (1, 2, 3):
            engine.write_assert(
                kind, id_from_int(i), PLAYER.encode(Player(f"p{i}", i)), WRITER, b""
            )
            # bounded only so that a stopped notifier fails the test instead of hanging it
            await asyncio.wait_for(engine.wait_notified(engine.generation), timeout=60)
        assert seen == [id_from_int(i) for i in (1, 2, 3)]
        assert engine.notified_generation == engine.flushed_generation
    finally:
        await engine.close()
        engine.store.close()


async def test_flushes_queued_behind_a_failing_listener_are_notified(tmp_path: Path) -> None:
    """Three flushes queued, the listener fails on the second: the third is still notified on
    an idle engine, and a listener after the failing one gets every flush."""
    engine, kind = watched_engine(tmp_path)
    failing: list[int] = []
    after: list[int] = []

    def fails_on_the_second(seq: int, changes: list[Change]) -> None:
        failing.append(seq)
        if len(failing) == 2:
            raise RuntimeError("a bug in a listener")

    engine.commit_listeners += [fails_on_the_second, lambda seq, changes: after.append(seq)]
    for i in (1, 2, 3):
        engine.write_assert(kind, id_from_int(i), PLAYER.encode(Player(f"p{i}", i)), WRITER, b"")
        await engine._flush_durably()  # committed; its notification queued
    last = engine.flushed_generation
    engine.start()  # the notifier finds them queued
    try:
        await asyncio.wait_for(engine.wait_notified(last), timeout=60)
        assert failing == after == [1, 2, 3]
    finally:
        await engine.close()
        engine.store.close()
