"""The engine against a reference model of SPEC §4 and §5, on random write histories.

The model is the spec read literally: each window keeps, per touched entity, the pending row and
source set, taken from the latest state at the first touch and updated write by write; a flush
compares each with the committed state. The engine keeps something cheaper (what each window
did, resolved against the committed state only when it flushes), so the two must agree on every
committed state, every notified change, every version, every RETRACT's answer and every epoch
count, including writes that arrive while a flush is committing. Real engines over real stores,
in-process; in-memory and disk-backed kinds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convergedb import id_from_int
from convergedb.protocol.codes import DeleteCause
from convergedb.schema.patch import apply_patch, encode_patch
from convergedb.server.catalog import Catalog, KindState
from convergedb.server.engine import ChangeKind, Engine
from convergedb.server.storage import Store
from kinds import MATCH

ENTITIES = 6
SOURCES = (1 << 1, 1 << 2, 1 << 3)


@dataclasses.dataclass
class ModelEntity:
    row: bytes
    version: int
    sources: int


class Model:
    """SPEC §4-§5 applied write by write."""

    def __init__(self, kind: KindState) -> None:
        self.codec = kind.codec
        self.committed: dict[bytes, ModelEntity] = {}
        self.pending: dict[bytes, tuple[bytes | None, int]] = {}

    def _now(self, eid: bytes) -> tuple[bytes | None, int]:
        if eid in self.pending:
            return self.pending[eid]
        e = self.committed.get(eid)
        if e is None or not e.sources:
            return None, 0
        return e.row, e.sources

    def assert_(self, eid: bytes, row: bytes, bit: int) -> None:
        _, sources = self._now(eid)
        self.pending[eid] = (row, sources | bit)

    def patch(self, eid: bytes, mask: int, values: bytes, bit: int) -> None:
        row, sources = self._now(eid)
        base = row if sources and row is not None else self.codec.zero_row
        self.pending[eid] = (apply_patch(self.codec, base, mask, values), sources | bit)

    def retract(self, eid: bytes, bit: int) -> bool:
        row, sources = self._now(eid)
        if not sources & bit:
            if eid not in self.pending:
                self.pending[eid] = (row, sources)
            return False
        sources &= ~bit
        self.pending[eid] = (row if sources else None, sources)
        return True

    def held_by(self, bit: int) -> set[bytes]:
        eids = {eid for eid, e in self.committed.items() if e.sources & bit}
        for eid in self.pending:
            if self._now(eid)[1] & bit:
                eids.add(eid)
            else:
                eids.discard(eid)
        return eids

    def flush(self) -> set[tuple[bytes, ChangeKind]]:
        changes = set()
        for eid, (row, sources) in self.pending.items():
            base = self.committed.get(eid)
            if sources:
                assert row is not None
                if base is None or not base.sources:
                    version = 1 if base is None else base.version + 1
                    self.committed[eid] = ModelEntity(row, version, sources)
                    changes.add((eid, ChangeKind.CREATED))
                elif row != base.row:
                    self.committed[eid] = ModelEntity(row, base.version + 1, sources)
                    changes.add((eid, ChangeKind.UPDATED))
                else:
                    base.sources = sources
            elif base is not None and base.sources:
                self.committed[eid] = ModelEntity(b"", base.version + 1, 0)
                changes.add((eid, ChangeKind.DELETED))
        self.pending = {}
        return changes


def make_engine(directory: Path, *, disk_backed: bool) -> tuple[Engine, KindState]:
    catalog = Catalog()
    engine = Engine(catalog, Store(directory, fsync=False), window_ms=20)
    engine.load()
    definition = dataclasses.replace(MATCH.definition, disk_backed=disk_backed)
    kind, _ = catalog.register(definition)
    kind.watchers = 1  # changes are built as for a watched kind
    engine.kind_changed(kind, None)
    return engine, kind


def engine_state(
    engine: Engine, kind: KindState, entities: int = ENTITIES
) -> dict[bytes, tuple[bytes, int, int]]:
    state = {}
    for i in range(entities):
        eid = id_from_int(i)
        e = engine.committed(kind, eid)
        if e is not None:
            state[eid] = (e.row if e.sources else b"", e.version, e.sources)
    return state


def model_state(model: Model) -> dict[bytes, tuple[bytes, int, int]]:
    return {eid: (e.row, e.version, e.sources) for eid, e in model.committed.items()}


write = st.one_of(
    st.tuples(
        st.just("assert"), st.integers(0, ENTITIES - 1), st.sampled_from(SOURCES), st.integers(0, 2)
    ),
    st.tuples(
        st.just("patch"), st.integers(0, ENTITIES - 1), st.sampled_from(SOURCES), st.integers(0, 2)
    ),
    st.tuples(
        st.just("retract"), st.integers(0, ENTITIES - 1), st.sampled_from(SOURCES), st.just(0)
    ),
    st.tuples(st.just("epoch"), st.just(0), st.sampled_from(SOURCES), st.just(0)),
)
step = st.one_of(
    write,
    st.just(("flush", 0, 0, 0)),
    st.just(("in_flight", 0, 0, 0)),  # start a flush and keep writing while it commits
)


def apply_write(
    engine: Engine, kind: KindState, model: Model, op: tuple[str, int, int, int]
) -> None:
    name, i, bit, variant = op
    eid = id_from_int(i)
    if name == "assert":
        row = kind.codec.encode([f"m{variant}", variant])
        engine.write_assert(kind, eid, row, bit, b"")
        model.assert_(eid, row, bit)
    elif name == "patch":
        mask, values = encode_patch(kind.codec, {1: variant + 7})
        engine.write_patch(kind, eid, mask, values, bit, b"")
        model.patch(eid, mask, values, bit)
    elif name == "retract":
        expected = model.retract(eid, bit)
        assert engine.write_retract(kind, eid, bit, b"") == expected
    else:  # what an epoch end does with the entities the source holds (none re-asserted)
        held = {eid for _, eid in engine.held_by(bit, system=False)}
        assert held == model.held_by(bit)
        retracted = engine.retract_many(
            [(kind, eid) for eid in sorted(held)], bit, DeleteCause.EPOCH_END
        )
        assert retracted == sum(model.retract(eid, bit) for eid in sorted(held))


async def run_history(
    directory: Path,
    steps: list[tuple[str, int, int, int]],
    *,
    disk_backed: bool,
    entities: int = ENTITIES,
    in_flight_writes: int = 4,
) -> None:
    engine, kind = make_engine(directory, disk_backed=disk_backed)
    model = Model(kind)
    notified: dict[int, set[tuple[bytes, ChangeKind]]] = {}
    # a big flush is notified in slices: one set per flush seq
    engine.commit_listeners.append(
        lambda seq, changes: notified.setdefault(seq, set()).update(
            (c.eid, c.change) for c in changes
        )
    )
    await engine.flush()  # the kind
    notified.clear()

    async def flush(in_flight: list[tuple[str, int, int, int]]) -> None:
        expected = model.flush()
        task = asyncio.ensure_future(engine.flush())
        await asyncio.sleep(0)  # the flush has computed and awaits its commit
        for op in in_flight:
            apply_write(engine, kind, model, op)
        await task
        assert len(notified) <= 1  # one flush, one seq (however many slices)
        got = set().union(*notified.values())
        notified.clear()
        assert got == expected
        assert engine_state(engine, kind, entities) == model_state(model)

    index = 0
    while index < len(steps):
        op = steps[index]
        index += 1
        if op[0] == "flush":
            await flush([])
        elif op[0] == "in_flight":
            ahead = steps[index : index + in_flight_writes]
            during = [s for s in ahead if s[0] not in ("flush", "in_flight")]
            index += len(during)
            await flush(during)
        else:
            apply_write(engine, kind, model, op)
    await flush([])
    await engine.close()
    engine.store.close()


def test_big_flushes_are_computed_and_notified_in_slices(tmp_path: Path) -> None:
    """Flushes of thousands of entities (an expiry, an epoch end) are computed and notified a
    slice at a time, the event loop free in between: writes that arrive meanwhile, to the same
    entities, must still see the flush being computed as what will be committed."""
    count = 10_000
    a, b = SOURCES[0], SOURCES[1]
    steps: list[tuple[str, int, int, int]] = [("assert", i, a, i % 3) for i in range(count)]
    steps += [("assert", i, b, i % 3) for i in range(0, count, 3)]
    steps.append(("flush", 0, 0, 0))
    steps += [("retract", i, a, 0) for i in range(count)]  # a's expiry, in effect
    steps.append(("in_flight", 0, 0, 0))
    during = [("retract", i, b, 0) for i in range(0, 600, 3)]
    during += [("patch", i, a, 1) for i in range(1, 600, 3)]
    steps += during
    steps.append(("flush", 0, 0, 0))
    asyncio.run(
        run_history(
            tmp_path / "big", steps, disk_backed=False, entities=count, in_flight_writes=len(during)
        )
    )


_dirs = iter(range(1_000_000))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.lists(step, max_size=40), disk_backed=st.booleans())
def test_engine_matches_the_model(tmp_path: Path, steps: list[Any], disk_backed: bool) -> None:
    asyncio.run(run_history(tmp_path / str(next(_dirs)), steps, disk_backed=disk_backed))


def test_a_known_history_is_checked(tmp_path: Path) -> None:
    """Assert, re-assert identical, retract by one of two, re-create within a window, epoch."""
    a, b = SOURCES[0], SOURCES[1]
    steps = [
        ("assert", 0, a, 0), ("assert", 0, b, 0), ("flush", 0, 0, 0),
        ("retract", 0, a, 0), ("assert", 1, a, 1), ("retract", 1, a, 0), ("flush", 0, 0, 0),
        ("retract", 0, b, 0), ("assert", 0, a, 2), ("in_flight", 0, 0, 0), ("patch", 0, b, 1),
        ("retract", 0, a, 0), ("epoch", 0, b, 0), ("patch", 2, a, 2), ("flush", 0, 0, 0),
    ]  # fmt: skip
    asyncio.run(run_history(tmp_path / "known", steps, disk_backed=False))
