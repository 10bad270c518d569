"""The write engine: the accumulator, the flush, and the committed state.

Writes do not touch the committed state. Each updates the accumulator: one entry per touched
entity recording what this window's writes did to it (the last row, which source bits were set
and cleared), without looking at the committed state. Every coalescing window the engine
flushes: it swaps in an empty accumulator (new writes keep arriving), computes each touched
entity's net change against the committed state, commits the whole flush in one store
transaction on the store's thread, then applies it to the in-memory tables and hands the
changes to the listeners (subscriptions), in that order. Flushes run one after another, so the
committed state a flush computes against includes every flush before it.

While a flush is being committed its results are the "in-flight" state: the few writes that
must know whether a source holds an entity now (RETRACT, PATCH, epochs) look there first.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum
from itertools import islice
from typing import Any, Final, NamedTuple

from ..protocol.codes import DeleteCause, EventCause, Opcode
from ..schema.patch import apply_patch
from .catalog import Catalog, KindState
from .storage import ENTITY_HEAD_SIZE, LOG_HEAD, FlushWrite, Store
from .table import Entity

log = logging.getLogger("convergedb.engine")

BACKLOG_WINDOWS: Final = 50
"""While a flush commits, connections read on until the next accumulator has waited this many
windows (see `Engine.overdue`)."""

COMPUTE_SLICE: Final = 4096
"""A flush computes its net changes this many entities at a time, letting the event loop serve
connections in between (only a flush bigger than this yields: an expiry, an epoch end)."""
RELEASE_SLICE: Final = 8192
"""Objects a committed expiry's leftovers are freed at a time."""
EXPIRY_SLICE: Final = 1024
"""An expiry being prepared computes this many entities at a time: it runs beside the regular
flushes, so the other writers wait at most one such slice at a time for it."""
EXPIRY_SEQ_GAP: Final = 1 << 20
"""How far ahead of the committed seq an expiry prepared in the background is numbered: the
regular flushes that commit while it is prepared take the seqs in between (see `_Expiry`)."""
NOTIFY_SLICE: Final = 2048
"""Changes handed to the subscriptions at a time, the event loop served in between."""
NOTIFY_BACKLOG: Final = 200_000
"""Changes (and events) that may wait behind the flush whose notifications are being sent
before flushing waits too: the subscriptions are behind, so writers are pushed back. Counted in
changes, not flushes: the small flushes that go on while a big one (an expiry) is being sent
out hold little, and must not wait for all of it."""

_EVENT_CAUSE: Final = {
    DeleteCause.RETRACTED: EventCause.CLIENT_WRITE,
    DeleteCause.EPOCH_END: EventCause.EPOCH_END,
    DeleteCause.LIVENESS: EventCause.LIVENESS,
}


class ChangeKind(IntEnum):
    """What a flush did to an entity, as its subscribers see it."""

    CREATED = 1
    UPDATED = 2
    DELETED = 4


class Change(NamedTuple):
    """One entity's net change in a flush: what subscribers are told."""

    kind: KindState
    eid: bytes
    change: ChangeKind
    entity: Entity
    """The committed state after the flush (row empty when deleted)."""
    previous: bytes | None
    """The row before (Updated and Deleted), as the current schema version."""
    meta: bytes

    def changed_fields(self) -> int:
        """The bitmask of changed fields: every field for Created (and Deleted)."""
        if self.change is ChangeKind.UPDATED:
            assert self.previous is not None
            return self.kind.codec.changed_fields(self.previous, self.entity.row)
        return self.kind.codec.all_fields_mask


class Event(NamedTuple):
    """One write to an event-stream kind, recorded before coalescing (SPEC §8)."""

    kind: KindState
    seq: int
    """The kind's event sequence number (assigned when the flush that carries it commits)."""
    source_id: int
    op: int
    """ASSERT, RETRACT or PATCH."""
    cause: int
    """EventCause: a client write, an epoch end, a liveness expiry."""
    eid: bytes
    mask: int
    data: bytes
    meta: bytes


# An accumulator entry: what this window's writes did to one entity, as a list (made per write,
# so as cheap as Python can make an object): [row, set, clear, meta, cause, result].
# - row: the last asserted or patched row, as the current schema version (None if no source
#   asserted or patched it in this window: the row stays as committed);
# - set / clear: the source bits whose latest write in this window asserts / retracts it;
#   the flush computes sources = (committed sources & ~clear) | set;
# - meta: the last write's metadata; cause: the DeleteCause of its last effective retract;
# - result: the state the flush computed for it, set while that flush commits (None: as
#   committed).
# The committed state is looked up when the flush computes, not at the write: the flush before
# has committed by then, so no write needs the state of a flush in flight (the slow paths that
# ask "does this source hold it now?" look through `_latest`).
_ROW, _SET, _CLEAR, _META, _CAUSE, _RESULT = range(6)
Entry = list[Any]
_RETRACTED: Final = DeleteCause.RETRACTED
_ASSERT_OP: Final = int(Opcode.ASSERT)
_PATCH_OP: Final = int(Opcode.PATCH)
_RETRACT_OP: Final = int(Opcode.RETRACT)


Accumulator = dict[int, dict[bytes, Entry]]
Plan = tuple[int, list[Change], FlushWrite]
"""A flush being computed: (its seq, the changes to notify, what to commit)."""
CommitListener = Callable[[int, list[Change]], None]
EventListener = Callable[[list[Event]], None]


class Engine:
    """Applies writes to the accumulator and flushes it every window."""

    def __init__(self, catalog: Catalog, store: Store, *, window_ms: int) -> None:
        self.catalog = catalog
        self.store = store
        self.window_s = window_ms / 1000
        self.seq = store.load_seq()
        """The seq of the last committed flush that changed something."""
        self.generation = 1
        """The number of the accumulator that writes go into now."""
        self.flushed_generation = 0
        """The last generation whose flush has committed."""
        self.commit_listeners: list[CommitListener] = []
        """Called with (seq, changes of watched kinds) after each flush that changed something."""
        self.event_listeners: list[EventListener] = []
        """Called with the events of each flush, in order, once it has committed."""
        self._events: list[Event] = []
        self._held_readers: list[Callable[[], None]] = []
        self._deadlines: dict[int, int] = store.load_source_deadlines()
        self._new_deadlines: dict[int, int] = {}
        self._tombstones: deque[tuple[int, int, bytes]] = deque()
        """(deleted_at_ms, kind_id, eid) of every tombstone, oldest first, for compaction."""
        self._removals: list[tuple[int, bytes, int]] = []
        """(kind_id, eid, seq) of tombstones compaction chose, removed by the next flush."""
        self.asserts = 0
        self.patches = 0
        self.retracts = 0
        self.flushes = 0
        self.compacted_seq = store.load_compacted_seq()
        """The highest seq of a tombstone that compaction removed: a RESUME from an older seq
        cannot be answered with a delta (it would miss that deletion)."""
        self._accumulator: Accumulator = {}
        self._in_flight: Accumulator = {}
        """The accumulator of the flush being committed; its entries hold their results."""
        self._expiry: _Expiry | None = None
        """The liveness expiry being prepared beside the regular flushes, if any."""
        self.expiry_slice = EXPIRY_SLICE
        self.expiry_seq_gap = EXPIRY_SEQ_GAP
        self._dirty_kinds: dict[int, KindState] = {}
        self._dirty = False
        self._first_dirty_at = 0.0
        self._flushing = False
        self._committing_seq = 0
        """The seq the flush under way will commit with, if it changes something (0: none)."""
        self._releasing: asyncio.Task[None] | None = None
        """Freeing what the last expiry held (`_release_in_slices`)."""
        self._not_committing = asyncio.Event()
        self._not_committing.set()
        self._last_flush_start = 0.0
        self._wake = asyncio.Event()
        self._waiters: dict[int, list[asyncio.Future[int]]] = {}
        self._notified_waiters: dict[int, list[asyncio.Future[int]]] = {}
        self.notified_generation = 0
        """The last generation whose changes and events the listeners have all been given."""
        self._notifications: deque[_Notification] = deque()
        self._queued_changes = 0
        """The changes and events of the flushes in `_notifications`."""
        self._last_queued = 0
        """Those of the last flush queued (not behind anything the flush loop could wait for)."""
        self._notify_lock = asyncio.Lock()
        self._notify_wake = asyncio.Event()
        self._notifier: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convergedb-store")
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.last_flush_seconds = 0.0
        self.failure: BaseException | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self.on_flushed: Callable[[float], None] | None = None
        """Called with the duration of every flush (metrics)."""

    # committed state -----------------------------------------------------------------------------

    def load(self) -> int:
        """Load every kind, and the entities of in-memory kinds, from the store (the checkpoint,
        then the log records after it); queue every tombstone for compaction."""
        count = 0
        tombstones: list[tuple[int, int, bytes]] = []
        for stored in self.store.load_kinds():
            kind = self.catalog.load(stored)
            if kind.entities is not None:
                kind.entities.update(self.store.iter_entities(kind.kind_id))
        self._replay_log()
        for kind in self.catalog.by_id.values():
            dead = [
                (e.deleted_at_ms, kind.kind_id, eid) for eid, e in self._all(kind) if not e.sources
            ]
            tombstones.extend(dead)
            kind.tombstones = len(dead)
            if kind.entities is not None:
                count += len(kind.entities)
                kind.alive = len(kind.entities) - len(dead)
            else:
                kind.alive = self.store.count_entities(kind.kind_id) - len(dead)
        tombstones.sort()
        self._tombstones.extend(tombstones)
        return count

    def _replay_log(self) -> None:
        """Apply the log records the checkpointer had not moved into the store's entities."""
        by_id = self.catalog.by_id
        for kind_id, eid, entity in self.store.replay_log():
            entities = by_id[kind_id].entities
            if entities is None:
                continue
            if entity is None:
                entities.pop(eid, None)
            else:
                entities[eid] = entity

    def _all(self, kind: KindState) -> Iterable[tuple[bytes, Entity]]:
        """Every committed entity of a kind (a scan of the store for a disk-backed kind)."""
        if kind.entities is not None:
            return kind.entities.items()
        return self.store.iter_entities(kind.kind_id)

    def committed(self, kind: KindState, eid: bytes) -> Entity | None:
        """The committed state of an entity (what queries see), or None."""
        entities = kind.entities
        if entities is not None:
            return entities.get(eid)
        return self.store.get_entity(kind.kind_id, eid)

    def _latest(self, kind: KindState, eid: bytes) -> Entity | None:
        """The state the entity will have when this window's flush computes: the committed
        state, with the flush being committed (if it touched the entity) applied to it. Only
        its row and source set are meaningful (versions are the flush's business)."""
        committed = self.committed(kind, eid)
        flying = self._in_flight.get(kind.kind_id) if self._in_flight else None
        entry = None if flying is None else flying.get(eid)
        if entry is None:
            return committed
        return _after(kind, committed, entry)

    def _per_kind(self, kind: KindState) -> dict[bytes, Entry]:
        """This window's entries of a kind (made, and the flush woken, at the first write)."""
        per_kind = self._accumulator.get(kind.kind_id)
        if per_kind is None:
            per_kind = self._accumulator[kind.kind_id] = {}
            self._mark_dirty()
        return per_kind

    def _sources_now(self, kind: KindState, eid: bytes, entry: Entry | None) -> int:
        """The entity's source set after the writes this window has taken so far."""
        latest = self._latest(kind, eid)
        sources = 0 if latest is None else latest.sources
        if entry is None:
            return sources
        return (sources & ~entry[_CLEAR]) | entry[_SET]  # type: ignore[no-any-return]

    def write_assert(self, kind: KindState, eid: bytes, row: bytes, bit: int, meta: bytes) -> None:
        """ASSERT: the source of `bit` says the entity is exactly `row` (validated here)."""
        codec = kind.codec
        if not codec.is_valid(row):
            codec.validate(row)  # raises, naming the field at fault
        per_kind = self._accumulator.get(kind.kind_id)
        if per_kind is None:
            per_kind = self._per_kind(kind)
        entry = per_kind.get(eid)
        if entry is None:
            per_kind[eid] = [row, bit, 0, meta, _RETRACTED, None]
        else:
            entry[0] = row  # the layout of Entry, inline: this is the hottest write
            entry[1] |= bit
            entry[2] &= ~bit
            entry[3] = meta
        self.asserts += 1
        if kind.event_stream:
            self._record(kind, bit, _ASSERT_OP, EventCause.CLIENT_WRITE, eid, 0, row, meta)

    def write_patch(
        self, kind: KindState, eid: bytes, mask: int, values: bytes, bit: int, meta: bytes
    ) -> None:
        """PATCH: set the fields of `mask`; a missing or dead entity starts from zero values."""
        per_kind = self._per_kind(kind)
        entry = per_kind.get(eid)
        if not self._sources_now(kind, eid, entry):
            base_row = kind.codec.zero_row
        elif entry is not None and entry[_ROW] is not None:
            base_row = entry[_ROW]
        else:
            latest = self._latest(kind, eid)
            assert latest is not None
            base_row = kind.current_row(latest)
        row = apply_patch(kind.codec, base_row, mask, values)
        if entry is None:
            per_kind[eid] = [row, bit, 0, meta, _RETRACTED, None]
        else:
            entry[_ROW] = row
            entry[_SET] |= bit
            entry[_CLEAR] &= ~bit
            entry[_META] = meta
        self.patches += 1
        if kind.event_stream:
            self._record(kind, bit, _PATCH_OP, EventCause.CLIENT_WRITE, eid, mask, values, meta)

    def write_retract(
        self,
        kind: KindState,
        eid: bytes,
        bit: int,
        meta: bytes,
        cause: DeleteCause = DeleteCause.RETRACTED,
    ) -> bool:
        """RETRACT: clear the bit; True if the source asserted the entity (else a no-op).

        `cause` says who retracts: the client, or the server at an epoch end or a liveness
        expiry (the cause of the tombstone and of the event).
        """
        per_kind = self._per_kind(kind)
        entry = per_kind.get(eid)
        self.retracts += 1
        asserted = bool(self._sources_now(kind, eid, entry) & bit)
        if kind.event_stream and (asserted or cause is DeleteCause.RETRACTED):
            self._record(kind, bit, _RETRACT_OP, _EVENT_CAUSE[cause], eid, 0, b"", meta)
        if not asserted:
            return False
        if entry is None:
            per_kind[eid] = [None, 0, bit, meta, cause, None]
        else:
            entry[_SET] &= ~bit
            entry[_CLEAR] |= bit
            entry[_META] = meta
            entry[_CAUSE] = cause
        return True

    @property
    def writes(self) -> dict[int, int]:
        """Writes applied, by opcode (synthesised retracts included)."""
        return {_ASSERT_OP: self.asserts, _PATCH_OP: self.patches, _RETRACT_OP: self.retracts}

    def held_by(self, bit: int, *, system: bool) -> list[tuple[KindState, bytes]]:
        """Every entity whose source set holds `bit`, pending writes included (a write sent
        before counts even if its flush has not run). System kinds only when `system`."""
        held: list[tuple[KindState, bytes]] = []
        for kind in list(self.catalog.by_id.values()):
            if not kind.system or system:
                held.extend((kind, eid) for eid in self._held_in(kind, bit))
        return held

    def _held_in(self, kind: KindState, bit: int) -> set[bytes]:
        """The ids of the entities of `kind` whose latest source set holds `bit`."""
        eids = {eid for eid, e in self._all(kind) if e.sources & bit}
        for accumulator in (self._in_flight, self._accumulator):  # oldest first
            for eid, entry in accumulator.get(kind.kind_id, {}).items():
                if entry[_SET] & bit:  # the latest write wins
                    eids.add(eid)
                elif entry[_CLEAR] & bit:
                    eids.discard(eid)
        return eids

    def retract_many(
        self, entities: list[tuple[KindState, bytes]], bit: int, cause: DeleteCause
    ) -> int:
        """Retract `bit` from each entity, as if its source had sent RETRACTs, all into the
        current window (hence one flush). Returns how many it actually retracted."""
        retracted = 0
        for kind, eid in entities:
            if self.write_retract(kind, eid, bit, b"", cause):
                retracted += 1
        return retracted

    def retract_everywhere(self, bit: int, cause: DeleteCause, *, system: bool) -> int:
        """Retract `bit` from every entity that holds it (pending writes included), all into
        the current window, as `retract_many(held_by(bit))` would; returns how many.

        A liveness expiry retracts a dead source from everything it held, which may be most
        of a kind. For in-memory kinds the entities that neither this window nor the flush
        being committed touched (nearly all of them) get their pending entry made directly
        from the committed state, in one pass over the table.
        """
        retracted = 0
        for kind in list(self.catalog.by_id.values()):
            if kind.system and not system:
                continue
            if kind.entities is None or kind.event_stream:
                held = self._held_in(kind, bit)
                retracted += self.retract_many([(kind, eid) for eid in held], bit, cause)
            else:
                retracted += self._retract_untouched(kind, kind.entities, bit, cause)
        return retracted

    def _retract_untouched(
        self, kind: KindState, entities: dict[bytes, Entity], bit: int, cause: DeleteCause
    ) -> int:
        per_kind = self._per_kind(kind)
        touched = {*per_kind, *self._in_flight.get(kind.kind_id, ())}
        retracted = 0
        for eid, base in entities.items():
            if base.sources & bit and eid not in touched:
                per_kind[eid] = [None, 0, bit, b"", cause, None]
                retracted += 1
        self.retracts += retracted
        for eid in touched:  # their latest state decides
            if self.write_retract(kind, eid, bit, b"", cause):
                retracted += 1
        return retracted

    # liveness expiries -------------------------------------------------------------------------

    def expire(self, bit: int, cause: DeleteCause) -> None:
        """Retract a dead source's `bit` from every entity that holds it (system kinds too), in
        one flush, ordered after every write received so far (SPEC §3).

        A dead source may hold most of a kind, and computing its retraction is the biggest
        flush there is. So its share in in-memory kinds is prepared in the background, a slice
        at a time, while regular flushes go on committing the other writers' writes; when it
        is ready it commits as one flush with the writes received by then (see `_Expiry`).
        Another expiry while one is being prepared, or one while closing, goes through the
        accumulator into the next flush.
        """
        if self._expiry is not None or self._closing:
            self.retract_everywhere(bit, cause, system=True)
            return
        # above the seq of the flush being committed too: it may be an expiry, numbered ahead
        reserved = max(self.seq, self._committing_seq) + self.expiry_seq_gap
        expiry = self._expiry = _Expiry(bit, cause, reserved)
        snapshots: list[tuple[KindState, list[tuple[bytes, Entity]]]] = []
        for kind in self.catalog.by_id.values():
            if kind.entities is None or kind.event_stream:
                continue  # retracted through the accumulator when the expiry commits
            kind_id = kind.kind_id
            snapshots.append((kind, list(kind.entities.items())))
            expiry.entries[kind_id] = {}
            expiry.versions[kind_id] = kind.schema_version
            # what the flush in flight and this window will change is computed at the end
            expiry.dirty[kind_id] = {
                *self._in_flight.get(kind_id, ()),
                *self._accumulator.get(kind_id, ()),
            }
        expiry.task = asyncio.get_running_loop().create_task(
            self._prepare_expiry_safely(expiry, snapshots), name="convergedb-expiry"
        )

    def source_reused(self, bit: int) -> None:
        """A connection took `bit` again (claim, takeover, allocation): an expiry of it still
        being prepared must come before that connection's writes, so it goes into this window
        through the accumulator instead."""
        expiry = self._expiry
        if expiry is not None and expiry.bit == bit:
            self._retract_through_accumulator(expiry)

    def _retract_through_accumulator(self, expiry: _Expiry) -> None:
        """Give up preparing `expiry` (nothing of it was applied) and retract its bit in the
        current window instead."""
        self._expiry = None
        self.retract_everywhere(expiry.bit, expiry.cause, system=True)

    async def _prepare_expiry_safely(
        self, expiry: _Expiry, snapshots: list[tuple[KindState, list[tuple[bytes, Entity]]]]
    ) -> None:
        try:
            await self._prepare_expiry(expiry, snapshots)
        except Exception:  # a bug here must not keep a dead source's entities alive
            log.exception("preparing the expiry of a source failed: retracting it directly")
            if expiry is self._expiry:
                self._retract_through_accumulator(expiry)

    async def _prepare_expiry(
        self, expiry: _Expiry, snapshots: list[tuple[KindState, list[tuple[bytes, Entity]]]]
    ) -> None:
        """Compute the expiry's retraction from the committed state, a slice at a time, the
        event loop served (and regular flushes committed) in between; then wake the flush
        loop to commit it. A regular flush that changes an entity already computed marks it
        dirty (`_apply`): it is computed again when the expiry commits."""
        bit, cause = expiry.bit, expiry.cause
        for kind, snapshot in snapshots:
            kind_id = kind.kind_id
            entries = expiry.entries[kind_id]
            dirty = expiry.dirty[kind_id]
            applied = expiry.applied[kind_id] = []
            tombstones = expiry.tombstones
            step = self.expiry_slice
            for start in range(0, len(snapshot), step):
                await asyncio.sleep(0)
                # not while a flush commits: compiled code holds the GIL for a whole slice,
                # and the store's thread needs it several times per commit. Once per slice:
                # when commits follow each other back to back, it still advances between them
                await self._not_committing.wait()
                if expiry is not self._expiry:
                    return  # given up (`source_reused`, `close`)
                fresh: list[tuple[bytes, Entry]] = []
                for eid, held in snapshot[start : start + step]:
                    # another source cannot clear this bit, and a write of this source from
                    # before the expiry is in `dirty`: the snapshot says who holds it
                    if held[2] & bit:
                        entry: Entry = [None, 0, bit, b"", cause, None]
                        entries[eid] = entry
                        if eid not in dirty:
                            fresh.append((eid, entry))
                logged = 0 if expiry.plan is None else len(expiry.plan[2].log)
                expiry.plan = self._compute(
                    [(kind_id, fresh)], expiry.plan, expiry.seq, expiry.tally
                )
                # what applying it will take, ready-made: it is applied in one go
                for eid, entry in fresh:
                    entity = entry[_RESULT]
                    if entity is not None:
                        applied.append((eid, entity))
                        if not entity[2]:
                            tombstones.append((entity[6], kind_id, eid))
                log_parts = expiry.plan[2].log
                log_parts[logged:] = [b"".join(log_parts[logged:])]
        if expiry is self._expiry:
            expiry.ready = True
            self._mark_dirty()

    def _complete_expiry(self, expiry: _Expiry) -> None:
        """Before the expiry's flush takes the accumulator: retract its bit from what its
        preparation could not compute (entities changed since, or written in this window;
        disk-backed and event-stream kinds) through the accumulator, after this window's
        writes; drop what it computed for them; count its births and deaths."""
        by_id = self.catalog.by_id
        plan = expiry.plan
        stale: set[tuple[int, bytes]] = set()
        retracted = 0
        for kind_id, entries in expiry.entries.items():
            kind = by_id[kind_id]
            redo = expiry.dirty[kind_id]
            redo.update(self._accumulator.get(kind_id, {}).keys() & entries.keys())
            if kind.schema_version != expiry.versions[kind_id]:
                redo.update(entries)  # its rows were evolved meanwhile
            counts = expiry.tally.setdefault(kind_id, [0, 0])
            for eid in redo:
                entry = entries.pop(eid, None)
                computed = None if entry is None else entry[_RESULT]
                if computed is not None:
                    stale.add((kind_id, eid))
                    if not computed[2]:  # it counted a death that may not happen
                        counts[0] += 1
                        counts[1] -= 1
                    if plan is not None:  # supersedes its record in the log value
                        now = self.committed(kind, eid)
                        assert now is not None, "an entity a source holds is not compacted"
                        plan[2].log_entity(kind_id, eid, now)
                if self.write_retract(kind, eid, expiry.bit, b"", expiry.cause):
                    retracted += 1
            retracted += len(entries)
            self.retracts += len(entries)
        for kind_id, (alive, tombstones) in expiry.tally.items():
            by_id[kind_id].alive += alive
            by_id[kind_id].tombstones += tombstones
        if stale and plan is not None:
            plan[1][:] = [c for c in plan[1] if (c.kind.kind_id, c.eid) not in stale]
            for kind_id, applied in expiry.applied.items():
                applied[:] = [(eid, e) for eid, e in applied if (kind_id, eid) not in stale]
            expiry.tombstones[:] = [t for t in expiry.tombstones if (t[1], t[2]) not in stale]
        for kind in list(by_id.values()):
            if kind.kind_id not in expiry.entries:
                held = self._held_in(kind, expiry.bit)
                retracted += self.retract_many(
                    [(kind, eid) for eid in held], expiry.bit, expiry.cause
                )
        log.info(
            "expiry of source %d: retracted from %d entities (flush %d)",
            expiry.bit.bit_length() - 1,
            retracted,
            expiry.seq,
        )

    def sources_in_use(self) -> int:
        """The union of every committed entity's source set (at start-up: who holds what)."""
        used = 0
        for kind in self.catalog.by_id.values():
            for _, entity in self._all(kind):
                used |= entity.sources
        return used

    def declare_deadline(self, source_id: int, deadline_ms: int) -> None:
        """Persist a source's declared liveness deadline with the next flush (used for its
        countdown after a restart)."""
        if self._deadlines.get(source_id) != deadline_ms:
            self._deadlines[source_id] = deadline_ms
            self._new_deadlines[source_id] = deadline_ms
            self._mark_dirty()

    def deadline_of(self, source_id: int, default_ms: int) -> int:
        return self._deadlines.get(source_id, default_ms)

    # compaction ----------------------------------------------------------------------------------

    def compact(self, expired_before_ms: int) -> int:
        """Schedule the removal of tombstones that died before `expired_before_ms`; they are
        removed (memory and store) by the next flush. Returns how many were scheduled."""
        queue = self._tombstones
        scheduled = 0
        while queue and queue[0][0] < expired_before_ms:
            deleted_at, kind_id, eid = queue.popleft()
            kind = self.catalog.by_id.get(kind_id)
            entity = None if kind is None else self.committed(kind, eid)
            if entity is None or entity.sources or entity.deleted_at_ms != deleted_at:
                continue  # re-created, or already gone
            self._removals.append((kind_id, eid, entity.seq))
            scheduled += 1
        if scheduled:
            self._mark_dirty()
        return scheduled

    def _record(
        self,
        kind: KindState,
        bit: int,
        op: int,
        cause: int,
        eid: bytes,
        mask: int,
        data: bytes,
        meta: bytes,
    ) -> None:
        """Record one operation on an event-stream kind; numbered when its flush commits."""
        source_id = bit.bit_length() - 1
        self._events.append(Event(kind, 0, source_id, op, cause, eid, mask, data, meta))
        self._mark_dirty()

    @staticmethod
    def _number_events(events: list[Event], kinds: dict[int, KindState]) -> list[Event]:
        """Give each event its kind's next sequence number; the kinds whose counters moved join
        `kinds`, so that the counters commit with the flush."""
        numbered = []
        for event in events:
            kind = event.kind
            kind.event_seq += 1
            numbered.append(event._replace(seq=kind.event_seq))
            kinds[kind.kind_id] = kind
        return numbered

    def kind_changed(self, kind: KindState, widened_from: int | None) -> None:
        """A kind was created or evolved: persist it with the next flush. When fields were
        appended, widen the rows pending in the accumulator from `widened_from` fields."""
        self._dirty_kinds[kind.kind_id] = kind
        self._mark_dirty()
        if widened_from is not None:
            for entry in self._accumulator.get(kind.kind_id, {}).values():
                if entry[_ROW] is not None:
                    entry[_ROW] = kind.codec.widen(entry[_ROW], widened_from)

    # flushing ------------------------------------------------------------------------------------

    def _mark_dirty(self) -> None:
        if not self._dirty:
            self._dirty = True
            self._first_dirty_at = time.monotonic()
            self._wake.set()

    def overdue(self) -> bool:
        """Whether connections should stop reading until the next flush has started.

        The event loop may keep reading busy sockets for a long time before it runs timers;
        connections ask this after each read and, when it is true, stop reading until the next
        flush has taken the accumulator (`hold_reading`). True once the accumulator has waited
        a whole window while no flush is under way (the flush is due: let it run), or
        `BACKLOG_WINDOWS` windows whatever happens (the disk is behind: push back on writers).
        While a flush computes and commits, the next cannot start anyway, and the loop would
        sit idle through the fsync: reading on lets the next flush carry what arrived meanwhile.
        """
        if not self._dirty:
            return False
        waited = time.monotonic() - self._first_dirty_at
        if self._flushing:
            return waited >= self.window_s * BACKLOG_WINDOWS
        return waited >= self.window_s

    def hold_reading(self, resume: Callable[[], None]) -> None:
        """Call `resume` once the next flush has taken the accumulator."""
        self._held_readers.append(resume)

    def wait_flushed(self, generation: int) -> asyncio.Future[int]:
        """A future resolved with the flush seq once generation `generation` has committed and
        queries see it (SYNC); its notifications may still be on their way."""
        return self._wait(self._waiters, self.flushed_generation, generation)

    def wait_notified(self, generation: int) -> asyncio.Future[int]:
        """A future resolved once generation `generation` has committed and the listeners have
        been given its changes and events (a new subscription starts from there)."""
        return self._wait(self._notified_waiters, self.notified_generation, generation)

    def _wait(
        self, waiters: dict[int, list[asyncio.Future[int]]], reached: int, generation: int
    ) -> asyncio.Future[int]:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if generation <= reached:
            future.set_result(self.seq)
        else:
            waiters.setdefault(generation, []).append(future)
        return future

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="convergedb-flush")
        self._notifier = loop.create_task(self._notify_forever(), name="convergedb-notify")

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                if not self._closing:
                    # at most one flush per window, counted from the last flush's start: an
                    # idle engine flushes a write at once, a busy one every window
                    delay = self._last_flush_start + self.window_s - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                self._last_flush_start = time.monotonic()
                await self._flush_durably()
                if self._queued_changes - self._last_queued > NOTIFY_BACKLOG:
                    await self._notify_pending()  # the subscribers are behind: wait for them
                if self._closing and not self._dirty:
                    return
        except Exception as exc:
            log.critical("flush failed; the server cannot make writes durable: %s", exc)
            self.failure = exc
            if self.on_failure is not None:
                self.on_failure(exc)

    async def flush(self) -> None:
        """Flush the accumulator now: compute, commit durably, apply, then notify (all done
        when this returns; the flush loop leaves the notifying to its own task)."""
        await self._flush_durably()
        await self._notify_pending()

    async def _flush_durably(self) -> None:
        """Compute, commit, apply; answer the SYNCs it covers; queue its notifications.

        When an expiry has been prepared, this flush is it: the writes received so far, then
        the expiry's retraction, numbered with the seq the expiry reserved."""
        started = time.perf_counter()
        if self._expiry is not None and self.seq + 1 >= self._expiry.seq:
            # the flushes meanwhile used up the seqs it left them: no longer in the background
            self._retract_through_accumulator(self._expiry)
        expiry = self._expiry if self._expiry is not None and self._expiry.ready else None
        if expiry is not None:
            self._expiry = None
            self._complete_expiry(expiry)
        accumulator, self._accumulator = self._accumulator, {}
        kinds, self._dirty_kinds = self._dirty_kinds, {}
        generation = self.generation
        self.generation += 1
        self._dirty = False
        self._wake.clear()
        events, self._events = self._events, []
        held, self._held_readers = self._held_readers, []
        for resume in held:
            resume()
        if events:
            events = self._number_events(events, kinds)
        in_flight = accumulator if expiry is None else expiry.merged_with(accumulator)
        self._in_flight = in_flight  # from now on writes see it as what will be committed
        self._flushing = True
        self._committing_seq = self.seq + 1 if expiry is None else expiry.seq
        try:
            if expiry is None:
                seq, changes, write = await self._compute_in_slices(accumulator, None, self.seq + 1)
            else:
                seq, changes, write = await self._compute_in_slices(
                    accumulator, expiry.plan, expiry.seq
                )
                if seq != expiry.seq:  # nothing changed after all (the plan's seq is older)
                    seq = write.seq = self.seq
            write.kinds = [kind.stored() for kind in kinds.values()]
            self._take_removals(accumulator, write)
            write.source_deadlines, self._new_deadlines = self._new_deadlines, {}
            if write.log or write.direct or write.kinds or write.removed or write.source_deadlines:
                loop = asyncio.get_running_loop()
                self._not_committing.clear()
                try:
                    await loop.run_in_executor(self._executor, self.store.commit, write)
                finally:
                    self._not_committing.set()
                self._apply(accumulator, write, expiry)
        finally:
            self._in_flight = {}
            self._flushing = False
            self._committing_seq = 0
        self.seq = seq
        self.flushed_generation = generation
        self.flushes += 1
        self.last_flush_seconds = time.perf_counter() - started
        if self.on_flushed is not None:
            self.on_flushed(self.last_flush_seconds)
        _resolve(self._waiters, generation, seq)
        self._notifications.append(_Notification(generation, seq, changes, events))
        self._last_queued = len(changes) + len(events)
        self._queued_changes += self._last_queued
        self._notify_wake.set()
        if expiry is not None:
            # an expiry leaves two objects and more per entity to free (~50 ms for 100,000):
            # a slice at a time, after the SYNCs it answered have replied
            self._releasing = asyncio.get_running_loop().create_task(
                _release_in_slices(expiry, in_flight)
            )

    async def _notify_forever(self) -> None:
        while True:
            await self._notify_wake.wait()
            self._notify_wake.clear()
            await self._notify_pending()

    async def _notify_pending(self) -> None:
        """Give the listeners every queued flush's changes and events, in flush order; a big
        flush's changes go in slices, the event loop served in between (other flushes go on)."""
        async with self._notify_lock:
            while self._notifications:
                generation, seq, changes, events = self._notifications.popleft()
                self._queued_changes -= len(changes) + len(events)
                try:
                    await self._notify(seq, changes, events)
                finally:
                    self.notified_generation = generation
                    _resolve(self._notified_waiters, generation, seq)

    async def _notify(self, seq: int, changes: list[Change], events: list[Event]) -> None:
        for start in range(0, len(changes), NOTIFY_SLICE):
            if start:
                await asyncio.sleep(0)
            part = (
                changes if len(changes) <= NOTIFY_SLICE else changes[start : start + NOTIFY_SLICE]
            )
            for listener in self.commit_listeners:
                try:
                    listener(seq, part)
                except Exception:  # a listener's bug: the others, and later flushes, go on
                    log.exception("a listener failed on the changes of flush %d", seq)
        if events:
            for event_listener in self.event_listeners:
                try:
                    event_listener(events)
                except Exception:
                    log.exception("a listener failed on the events of flush %d", seq)

    async def _compute_in_slices(
        self, accumulator: Accumulator, plan: Plan | None, seq: int
    ) -> Plan:
        """`_compute`, a slice of `COMPUTE_SLICE` entities at a time when the flush is bigger."""
        step = COMPUTE_SLICE
        if sum(map(len, accumulator.values())) <= step:
            return self._compute(
                [(kind_id, entries.items()) for kind_id, entries in accumulator.items()], plan, seq
            )
        for kind_id, per_kind in accumulator.items():
            # one iterator across the slices: the accumulator no longer changes (new writes
            # go to the next one), so iterating it across the pauses is safe
            items = iter(per_kind.items())
            for _ in range(0, len(per_kind), step):
                plan = self._compute([(kind_id, islice(items, step))], plan, seq)
                await asyncio.sleep(0)
        assert plan is not None
        return plan

    def _compute(
        self,
        parts: list[tuple[int, Iterable[tuple[bytes, Entry]]]],
        plan: Plan | None,
        seq: int,
        tally: dict[int, list[int]] | None = None,
    ) -> Plan:
        """The net change of the touched entities in `parts` ((kind id, its entries) pairs)
        against their committed state, as flush `seq`: (the flush's seq, the changes of
        watched kinds, what to commit). With `plan`, the result of the slices before, adds to
        it. With `tally` (an expiry being prepared), counts the kinds' births and deaths there
        ([alive, tombstones] by kind id) instead of in the kinds, and builds changes for every
        kind (a subscription may begin before it commits).

        Sets each changed entry's result. `Change`s are built only for kinds that someone
        watches. The hottest loop of the server: the common paths are inline, and entities are
        made with `tuple.__new__` (what `Entity(...)` does, without its Python-level frame).
        """
        if plan is None:
            changes: list[Change] = []
            write = FlushWrite(self.seq)
        else:
            _, changes, write = plan
        changed = 0
        now_ms = int(time.time() * 1000)
        by_id = self.catalog.by_id
        make = _new_tuple
        log_head = LOG_HEAD.pack
        head_size = ENTITY_HEAD_SIZE
        log = write.log
        for kind_id, items in parts:
            kind = by_id[kind_id]
            version = kind.schema_version
            watched = kind.watchers > 0 or tally is not None
            entities = kind.entities
            logged = entities is not None
            lookup = entities.get if entities is not None else self._stored_lookup(kind)
            born = died = revived = 0
            for eid, entry in items:
                row, set_bits, clear_bits, meta, cause, _ = entry
                base = lookup(eid)
                previous: bytes | None = None
                dead_cause = deleted_at = 0
                if base is None:
                    if not set_bits:
                        continue  # asserted and retracted within the window: nothing
                    new_version = 1
                    sources = set_bits
                    what = ChangeKind.CREATED
                    born += 1
                else:
                    old = base[2]
                    sources = (old & ~clear_bits) | set_bits
                    new_version = base[1] + 1
                    if not sources:
                        if not old:
                            continue  # a tombstone stays one
                        row = b""
                        dead_cause = cause
                        deleted_at = now_ms
                        what = ChangeKind.DELETED
                        died += 1
                        if watched:
                            previous = base[0] if base[4] == version else kind.current_row(base)
                    elif not old:
                        what = ChangeKind.CREATED
                        revived += 1
                    else:
                        previous = base[0] if base[4] == version else kind.current_row(base)
                        if row is None or row == previous:
                            if sources != old:  # the source set alone: no version
                                entry[5] = entity = base._replace(sources=sources)
                                self._record_state(write, logged, kind_id, eid, entity)
                            continue
                        what = ChangeKind.UPDATED
                entry[5] = entity = make(
                    Entity, (row, new_version, sources, seq, version, dead_cause, deleted_at)
                )
                if logged:  # the log record, inline (as FlushWrite.log_entity makes it)
                    head = log_head(
                        kind_id, eid, head_size + len(row), new_version, sources, seq, version,
                        dead_cause, deleted_at,
                    )  # fmt: skip
                    log.append(head)
                    log.append(row)
                else:
                    write.direct.append((kind_id, eid, entity))
                changed += 1
                if watched:
                    changes.append(make(Change, (kind, eid, what, entity, previous, meta)))
            if tally is None:
                kind.alive += born + revived - died
                kind.tombstones += died - revived
            else:
                counts = tally.setdefault(kind_id, [0, 0])
                counts[0] += born + revived - died
                counts[1] += died - revived
        if changed:  # the seq is the next one only if something changed
            write.seq = seq
        return write.seq, changes, write

    @staticmethod
    def _record_state(
        write: FlushWrite, logged: bool, kind_id: int, eid: bytes, entity: Entity
    ) -> None:
        if logged:
            write.log_entity(kind_id, eid, entity)
        else:
            write.direct.append((kind_id, eid, entity))

    def _stored_lookup(self, kind: KindState) -> Callable[[bytes], Entity | None]:
        kind_id = kind.kind_id
        get_entity = self.store.get_entity
        return lambda eid: get_entity(kind_id, eid)

    def _take_removals(self, accumulator: Accumulator, write: FlushWrite) -> None:
        """Move the scheduled compactions into this flush, except for entities this window
        touched (a write re-created them; compaction will look again when they die again)."""
        removals, self._removals = self._removals, []
        by_id = self.catalog.by_id
        for kind_id, eid, seq in removals:
            if eid in accumulator.get(kind_id, ()):
                continue
            now = self.committed(by_id[kind_id], eid)
            if now is None or now.sources or now.seq != seq:
                continue  # re-created (by a flush that was committing when compaction looked)
            write.removed.append((kind_id, eid, by_id[kind_id].entities is not None))
            if seq > write.compacted_seq:
                write.compacted_seq = seq
        if write.compacted_seq < self.compacted_seq:
            write.compacted_seq = self.compacted_seq

    def _apply(self, accumulator: Accumulator, write: FlushWrite, expiry: _Expiry | None) -> None:
        """Make a committed flush the state that queries see (with the expiry it completes)."""
        by_id = self.catalog.by_id
        tombstones = self._tombstones
        if expiry is not None:  # it never shares an entity with the accumulator
            for kind_id, applied in expiry.applied.items():
                entities = by_id[kind_id].entities
                assert entities is not None
                # the states it replaces are kept, to be freed a slice at a time later
                expiry.replaced.append([entities[eid] for eid, _ in applied])
                entities.update(applied)
            _merge_tombstones(tombstones, expiry.tombstones)
        preparing = self._expiry  # what it computed of the entities applied here is stale
        for kind_id, per_kind in accumulator.items():
            entities = by_id[kind_id].entities
            prepared: dict[bytes, Entry] | None = None  # None: no check on the hot path
            stale: set[bytes] = set()
            if preparing is not None and kind_id in preparing.entries:
                prepared, stale = preparing.entries[kind_id], preparing.dirty[kind_id]
            for eid, entry in per_kind.items():
                entity = entry[5]  # the result (Entry layout)
                if entity is None:
                    continue
                if prepared is not None and eid in prepared:
                    stale.add(eid)
                if entities is not None:
                    entities[eid] = entity
                if not entity[2] and entity[6]:  # a new tombstone: due for compaction
                    tombstones.append((entity[6], kind_id, eid))
        for kind_id, eid, _ in write.removed:
            kind = by_id[kind_id]
            kind.tombstones -= 1
            if kind.entities is not None:
                kind.entities.pop(eid, None)
        self.compacted_seq = write.compacted_seq

    async def close(self) -> None:
        """Flush everything received and send its notifications, then stop the flush loop,
        the notifier and the store thread."""
        self._closing = True
        if self._expiry is not None:
            self._retract_through_accumulator(self._expiry)
        self._wake.set()
        if self._task is not None:
            await self._task
        await self._notify_pending()
        if self._notifier is not None:
            self._notifier.cancel()
        self._executor.shutdown(wait=True)


class _Expiry:
    """A liveness expiry prepared beside the regular flushes (`Engine.expire`).

    It is numbered `seq`, reserved `EXPIRY_SEQ_GAP` ahead when it began, so that what it
    computes (entities, log records, changes) carries its final seq while the regular flushes
    that commit meanwhile take the seqs in between: seq order stays commit order. Its entries
    are the accumulator entries of a retraction of `bit`, by kind; `dirty` holds the entities
    a flush changed after (or while) it computed them, computed again when it commits.
    """

    def __init__(self, bit: int, cause: DeleteCause, seq: int) -> None:
        self.bit = bit
        self.cause = cause
        self.seq = seq
        self.entries: Accumulator = {}
        self.dirty: dict[int, set[bytes]] = {}
        self.versions: dict[int, int] = {}
        """The schema version of each kind when it began."""
        self.tally: dict[int, list[int]] = {}
        self.plan: Plan | None = None
        self.applied: dict[int, list[tuple[bytes, Entity]]] = {}
        """The entities it computed, by kind, as the flush that completes it applies them."""
        self.replaced: list[list[Entity]] = []
        """The states they replaced, once applied (freed a slice at a time)."""
        self.tombstones: list[tuple[int, int, bytes]] = []
        self.ready = False
        self.task: asyncio.Task[None] | None = None

    def merged_with(self, accumulator: Accumulator) -> Accumulator:
        """Its entries and the accumulator's (no entity is in both), for the flush to apply."""
        merged = dict(self.entries)
        for kind_id, per_kind in accumulator.items():
            entries = merged.get(kind_id)
            if entries is None:
                merged[kind_id] = per_kind
            else:
                entries.update(per_kind)
        return merged


class _Notification(NamedTuple):
    """A committed flush's changes and events, queued for the listeners."""

    generation: int
    seq: int
    changes: list[Change]
    events: list[Event]


def _resolve(waiters: dict[int, list[asyncio.Future[int]]], generation: int, seq: int) -> None:
    """Resolve the futures waiting for `generation` or an earlier one."""
    for waiting in sorted(g for g in waiters if g <= generation):
        for future in waiters.pop(waiting):
            if not future.done():
                future.set_result(seq)


_new_tuple: Final = tuple.__new__


async def _release_in_slices(expiry: _Expiry, in_flight: Accumulator) -> None:
    """Free what a committed expiry held, `RELEASE_SLICE` objects at a time, the event loop
    served in between (dropping it at once would hold the loop for tens of ms)."""
    in_flight.clear()  # the outer dict: its per-kind dicts are the expiry's entries too
    held: list[list[Any]] = [*expiry.replaced, *expiry.applied.values(), expiry.tombstones]
    expiry.replaced, expiry.applied, expiry.tombstones, expiry.plan = [], {}, [], None
    for items in held:
        while items:
            del items[-RELEASE_SLICE:]
            await asyncio.sleep(0)
    for entries in expiry.entries.values():
        while entries:
            for _ in range(min(RELEASE_SLICE, len(entries))):
                entries.popitem()
            await asyncio.sleep(0)


def _merge_tombstones(
    queue: deque[tuple[int, int, bytes]], new: list[tuple[int, int, bytes]]
) -> None:
    """Add `new` (oldest first) to the compaction queue, keeping it oldest first: an expiry's
    tombstones were dated while it was prepared, before those of the flushes meanwhile."""
    if not new:
        return
    later: list[tuple[int, int, bytes]] = []
    while queue and queue[-1][0] > new[0][0]:
        later.append(queue.pop())
    if later:
        later.reverse()
        queue.extend(heapq.merge(later, new))
    else:
        queue.extend(new)


def _after(kind: KindState, base: Entity | None, entry: Entry) -> Entity | None:
    """The row and source set an entity has once `entry` is applied to `base`."""
    row, set_bits, clear_bits = entry[_ROW], entry[_SET], entry[_CLEAR]
    sources = set_bits if base is None else (base.sources & ~clear_bits) | set_bits
    if base is None:
        return None if not sources else Entity(row, 0, sources, 0, kind.schema_version, 0, 0)
    if not sources:
        return base._replace(row=b"", sources=0)
    if row is None:
        return base._replace(sources=sources)
    return base._replace(row=row, sources=sources, schema_version=kind.schema_version)
