"""Subscriptions: live notifications, bootstrap, resume, slow-subscriber merging, event streams.

The connection delegates SUBSCRIBE, UNSUBSCRIBE and SUBSCRIBE_EVENTS here, and tells the hub when
its socket backs up (`pause`) or drains (`resume`) and when it goes away (`drop`). The engine
calls the hub after every flush (`_on_commit`, `_on_events`).

How it works (SPEC §8, §11; docs/protocol.md):

- **Registration first.** A SUBSCRIBE registers its subscription (and makes the engine describe the
  kind's changes: `kind.watchers`) before anything is read for the bootstrap, so nothing is ever
  missed. A flush computed before the registration but still committing is waited for
  (`_when_settled`): the engine did not describe its changes for an unwatched kind, so the
  subscription starts (OK, bootstrap) only once that flush is in the table. Until it has sent its
  OK (and BOOTSTRAP_BEGIN, when it bootstraps), a subscription is *held*: its live changes are
  merged (see below), not sent, so those two frames come first.
- **Fan-out.** Each change is encoded once per flush (two variants at most: without and with the
  previous state) as a `Prepared` frame; each subscriber gets it with its own 12-byte header
  (stream id = subscription id, CRC by linearity). Every connection gets one `transport.write`
  per flush for its state notifications (and one for its events, if any).
- **Bootstrap** runs in a task per subscription, in chunks of `CHUNK` entities, one write per
  chunk, waiting while the connection's socket is backed up and yielding to the loop after every
  chunk. In-memory kinds snapshot their key list and read each entity when its chunk is sent (its
  current state); disk-backed kinds scan the store in short read transactions. A full
  bootstrap's BOOTSTRAP_BEGIN count is the engine's count of alive entities; a delta first counts
  the entities changed after `since_seq` in a chunked pass (held meanwhile). BOOTSTRAP_END
  carries what was actually sent. Live notifications interleave; consumers keep the highest
  version.
- **Slow subscribers are merged, not dropped.** Once a connection's transport has paused and
  `subscriber_buffer` more frames were written to it, the hub stops writing: each subscription
  keeps one pending merged change per entity (latest state, or-ed changed fields; whether the
  subscriber "had" the entity is derived from the first merged change: it had it iff that change
  was an Updated or a Deleted, i.e. the entity was alive before it). When the socket drains, the
  merged changes go out in chunks, oldest last-change first, so a subscription's live seqs never
  go down. Only a connection that reads nothing for `subscriber_timeout_s` while it has output
  pending is closed (SLOW_SUBSCRIBER); progress is measured in bytes the socket accepted.
- **Event streams** (`events.py`): an event subscription is a cursor into its kind's shared ring.
  A subscriber that backs up stops being written to and falls behind in the ring; it catches up
  from the ring when it drains. If the ring overwrites events it has not received, the
  subscription ends with EVENTS_TRUNCATED on its own stream (the connection stays open).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import groupby
from operator import itemgetter
from typing import TYPE_CHECKING, Final

from ..protocol.codes import (
    BootstrapMode,
    ChangeType,
    ErrorCode,
    Opcode,
    SubscribeFlags,
)
from ..protocol.errors import ProtocolError, malformed
from ..protocol.frame import Frame
from ..protocol.messages import (
    BootstrapBegin,
    BootstrapEnd,
    Error,
    Message,
    Ok,
    Subscribe,
    SubscribeEvents,
    Unsubscribe,
)
from .catalog import KindState
from .engine import Change, ChangeKind, Event
from .events import (
    EMPTY_META,
    HEADER,
    EventRing,
    EventRings,
    Prepared,
    frame_header,
    meta_tail,
    prepare,
)
from .events import stream_crc as _stream_crc
from .table import Entity

if TYPE_CHECKING:
    from .app import Server
    from .connection import ServerConnection

log = logging.getLogger("convergedb.subscriptions")

CHUNK: Final = 512
"""Frames per write for bootstrap chunks and merged catch-up."""
COUNT_CHUNK: Final = 4096
"""Entities per step of a bootstrap's counting pass."""
ABORT_GRACE_S: Final = 5.0
"""After SLOW_SUBSCRIBER, how long (at least) a connection that still reads nothing may take to
accept its last frames before its socket is aborted."""
_UNLIMITED: Final = sys.maxsize

STATE_HEAD: Final = struct.Struct("<H32sBQQQQI")
"""STATE: kind_id, eid, type, version, source_set, changed_fields, seq, data length."""
DELETED_HEAD: Final = struct.Struct("<H32sQQB")
"""DELETED: kind_id, eid, version, seq, cause."""
_U32: Final = struct.Struct("<I")
_NO_PREVIOUS: Final = b"\x00\x00\x00\x00"
_STATE: Final = int(Opcode.STATE)
_DELETED: Final = int(Opcode.DELETED)
_BOOTSTRAP: Final = int(ChangeType.BOOTSTRAP)
_CREATED: Final = ChangeKind.CREATED
_UPDATED: Final = ChangeKind.UPDATED
_REMOVED: Final = ChangeKind.DELETED
_CHANGE_KIND: Final = itemgetter(0)
_HEADER_PACK: Final = HEADER.pack

EntityChunk = Sequence[tuple[bytes, Entity | None]]


# --- payloads -------------------------------------------------------------------------------------


def _blob32(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data if data else _NO_PREVIOUS


def state_payload(
    kind_id: int,
    eid: bytes,
    change_type: int,
    entity: Entity,
    changed_fields: int,
    row: bytes,
    previous: bytes,
    meta: bytes,
) -> bytes:
    """A STATE payload (byte for byte `messages.State.encode()`)."""
    head = STATE_HEAD.pack(
        kind_id,
        eid,
        change_type,
        entity.version,
        entity.sources,
        changed_fields,
        entity.seq,
        len(row),
    )
    return b"".join((head, row, _blob32(previous), meta_tail(meta)))


def deleted_payload(
    kind_id: int, eid: bytes, entity: Entity, previous: bytes, meta: bytes
) -> bytes:
    """A DELETED payload (byte for byte `messages.Deleted.encode()`)."""
    head = DELETED_HEAD.pack(kind_id, eid, entity.version, entity.seq, entity.cause)
    return b"".join((head, _blob32(previous), meta_tail(meta)))


def prepare_changes(
    changes: Sequence[Change],
    masks: Sequence[int],
    include_previous: bool,
    plain: Sequence[Prepared] | None = None,
) -> list[Prepared]:
    """One flush's changes of one kind as prepared STATE / DELETED frames.

    With `include_previous`, Updated and Deleted carry the previous state; Created frames are
    taken from `plain` when given (they are the same in both variants).
    """
    frames: list[Prepared] = []
    append = frames.append
    for index, change in enumerate(changes):
        what = change.change
        if what is _CREATED and plain is not None:
            append(plain[index])
            continue
        kind_id = change.kind.kind_id
        entity = change.entity
        previous = (change.previous or b"") if include_previous and what is not _CREATED else b""
        if what is _REMOVED:
            payload = deleted_payload(kind_id, change.eid, entity, previous, change.meta)
            append(prepare(_DELETED, payload))
        else:
            payload = state_payload(
                kind_id, change.eid, what, entity, masks[index], entity.row, previous, change.meta
            )
            append(prepare(_STATE, payload))
    return frames


# --- per-connection and per-subscription state ----------------------------------------------------


class Merged:
    """One entity's pending merged change for a backed-up subscriber."""

    __slots__ = ("change", "fields", "had", "previous")

    def __init__(self, change: Change, fields: int, had: bool, previous: bytes) -> None:
        self.change = change
        """The latest change merged (its state, seq and metadata win)."""
        self.fields = fields
        """The or-ed changed-field bits of every merged change."""
        self.had = had
        """Whether the subscriber holds the entity (it was alive before the first merged change)."""
        self.previous = previous
        """The state the subscriber holds (kept only for include_previous subscribers)."""


class Outbox:
    """What the hub knows of one connection's output: its subscriptions, whether its socket is
    backed up, and the frames of the write being built."""

    __slots__ = (
        "accepted_mark",
        "bytes_written",
        "closed",
        "connection",
        "count",
        "drain_handle",
        "last_progress",
        "merged_sent",
        "merging",
        "parts",
        "paused",
        "queued",
        "slow_closed",
        "subscriptions",
        "watchdog",
        "writable",
    )

    def __init__(self, connection: ServerConnection) -> None:
        self.connection = connection
        self.subscriptions: dict[int, StateSubscription | EventSubscription] = {}
        self.parts: list[bytes] = []
        self.count = 0
        """Frames in `parts`."""
        self.paused = False
        """The transport asked us to stop writing (pause_writing) and has not resumed."""
        self.queued = 0
        """Frames written since the transport paused."""
        self.merging = False
        """`subscriber_buffer` frames were written while paused: live changes are merged."""
        self.writable = asyncio.Event()
        self.writable.set()
        self.drain_handle: asyncio.Handle | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.bytes_written = 0
        self.accepted_mark = 0
        """Bytes the socket had accepted at the last sign of progress."""
        self.last_progress = 0.0
        self.slow_closed = False
        self.closed = False
        self.merged_sent = 0
        """Merged notifications sent since the connection last caught up."""

    @property
    def closing(self) -> bool:
        transport = self.connection.transport
        return transport is None or transport.is_closing()

    def accepted(self) -> int:
        """Bytes of ours the socket has taken so far (written minus still buffered)."""
        transport = self.connection.transport
        return self.bytes_written - (0 if transport is None else transport.get_write_buffer_size())

    def add(self, frame: Prepared, stream_id: int, crc: int) -> None:
        """Add one frame, addressed to `stream_id` (whose `stream_crc` is `crc`)."""
        self.parts += (frame_header(frame, stream_id, crc), frame.payload)
        self.count += 1

    def add_many(self, frames: Sequence[Prepared], stream_id: int, crc: int) -> None:
        """Add frames, addressed to `stream_id`: the hot path of the fan-out."""
        parts = self.parts
        append = parts.append
        pack = _HEADER_PACK
        for opcode, size, frame_crc, payload in frames:
            append(pack(1, 0, stream_id, opcode, size, frame_crc ^ crc))
            append(payload)
        self.count += len(frames)

    def add_message(self, message: Message, stream_id: int) -> None:
        """Add a control frame (OK, BOOTSTRAP_BEGIN/END, ERROR) on `stream_id`."""
        self.add(prepare(message.OPCODE, message.encode()), stream_id, _stream_crc(stream_id))

    def flush(self) -> int:
        """Write the frames added so far in one `transport.write`; the number of frames."""
        count = self.count
        if not count:
            return 0
        data = b"".join(self.parts)
        self.parts = []
        self.count = 0
        transport = self.connection.transport
        if transport is None or transport.is_closing() or self.closed:
            return 0
        if self.paused:
            self.queued += count
        self.bytes_written += len(data)
        transport.write(data)
        return count


class StateSubscription:
    """A SUBSCRIBE: live notifications (and a bootstrap) of one kind on one connection."""

    __slots__ = (
        "box",
        "closed",
        "crc",
        "drain_pos",
        "draining",
        "held",
        "include_previous",
        "kind",
        "pending",
        "sub_id",
        "task",
    )

    def __init__(self, box: Outbox, sub_id: int, kind: KindState, include_previous: bool) -> None:
        self.box = box
        self.sub_id = sub_id
        self.crc = _stream_crc(sub_id)
        self.kind = kind
        self.include_previous = include_previous
        self.held = True
        """Not started yet, or bootstrapping before its BOOTSTRAP_BEGIN: changes are merged."""
        self.pending: dict[bytes, Merged] | None = {}
        """Merged changes by entity id (oldest last change first); None while sent live."""
        self.draining: list[Merged | None] = []
        """Merged changes being sent (taken from `pending` as a whole)."""
        self.drain_pos = 0
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    def merge(self, changes: Sequence[Change], masks: Sequence[int]) -> None:
        """Merge changes into the pending ones (latest state wins, changed fields or-ed)."""
        pending = self.pending
        assert pending is not None
        keep_previous = self.include_previous
        for change, mask in zip(changes, masks, strict=True):
            eid = change.eid
            entry = pending.pop(eid, None)
            if entry is None:
                had = change.change is not _CREATED
                previous = (change.previous or b"") if keep_previous and had else b""
                entry = Merged(change, mask, had, previous)
            else:
                entry.change = change
                entry.fields |= mask
            pending[eid] = entry  # re-inserted last: the dict stays in last-change order

    def has_backlog(self) -> bool:
        """Merged changes wait to be sent (and may be sent now)."""
        return not self.held and (bool(self.pending) or self.drain_pos < len(self.draining))

    def merged_frame(self, entry: Merged) -> Prepared | None:
        """The frame that takes the subscriber from what it had to the entity's latest state
        (None when it never had the entity and the entity is gone)."""
        change = entry.change
        entity = change.entity
        kind_id = change.kind.kind_id
        if change.change is _REMOVED:
            if not entry.had:
                return None
            return prepare(
                _DELETED, deleted_payload(kind_id, change.eid, entity, entry.previous, change.meta)
            )
        if entry.had:
            change_type, fields, previous = int(ChangeType.UPDATED), entry.fields, entry.previous
        else:
            change_type, fields, previous = (
                int(ChangeType.CREATED),
                change.kind.codec.all_fields_mask,
                b"",
            )
        payload = state_payload(
            kind_id, change.eid, change_type, entity, fields, entity.row, previous, change.meta
        )
        return prepare(_STATE, payload)


class EventSubscription:
    """A SUBSCRIBE_EVENTS: a cursor into its kind's event ring."""

    __slots__ = ("box", "closed", "crc", "cursor", "held", "kind_id", "lagging", "ring", "sub_id")

    def __init__(self, box: Outbox, sub_id: int, kind_id: int) -> None:
        self.box = box
        self.sub_id = sub_id
        self.crc = _stream_crc(sub_id)
        self.kind_id = kind_id
        self.ring: EventRing | None = None
        self.cursor = 0
        """The seq of the next event to send."""
        self.held = True
        """Not started yet (a flush was committing when it arrived)."""
        self.lagging = False
        """Behind the ring's head: fed from the ring by the drain, not by live delivery."""
        self.closed = False

    def has_backlog(self) -> bool:
        return not self.held and self.lagging


# --- the hub --------------------------------------------------------------------------------------


class SubscriptionHub:
    """Every subscription of the server, fed by the engine after each flush."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.engine = server.engine
        config = server.config
        self._buffer = config.subscriber_buffer
        self._timeout = config.subscriber_timeout_s
        self._boxes: dict[ServerConnection, Outbox] = {}
        self._by_kind: dict[int, list[StateSubscription]] = {}
        self._event_subs: dict[int, list[EventSubscription]] = {}
        self.rings = EventRings(config.event_ring)
        self._closed = False
        self.notifications = 0
        """Live notification frames written (merged ones included)."""
        self.slow_closes = 0
        """Connections closed with SLOW_SUBSCRIBER."""
        self.engine.commit_listeners.append(self._on_commit)
        self.engine.event_listeners.append(self._on_events)

    # figures -------------------------------------------------------------------------------------

    @property
    def subscriber_count(self) -> int:
        """Live state and event subscriptions."""
        return sum(len(box.subscriptions) for box in self._boxes.values())

    def pending_merged(self) -> int:
        """Merged changes held for backed-up subscribers, all together (bounded by entities)."""
        total = 0
        for box in self._boxes.values():
            for sub in box.subscriptions.values():
                if isinstance(sub, StateSubscription):
                    total += len(sub.pending or ()) + len(sub.draining) - sub.drain_pos
        return total

    # requests ------------------------------------------------------------------------------------

    def on_subscribe(self, connection: ServerConnection, frame: Frame) -> None:
        """SUBSCRIBE: register, reply OK, then bootstrap if asked."""
        request = Subscribe.decode(frame.payload)
        kind = self.server.catalog.get(request.kind_id, Opcode.SUBSCRIBE)
        box = self._new_subscription_box(connection, frame.stream_id, Opcode.SUBSCRIBE)
        flags = request.flags
        sub = StateSubscription(
            box, frame.stream_id, kind, bool(flags & SubscribeFlags.INCLUDE_PREVIOUS)
        )
        box.subscriptions[sub.sub_id] = sub
        self._by_kind.setdefault(kind.kind_id, []).append(sub)
        kind.watchers += 1
        bootstrap = bool(flags & (SubscribeFlags.BOOTSTRAP | SubscribeFlags.RESUME))
        since = request.since_seq if flags & SubscribeFlags.RESUME else None
        self._when_settled(lambda: self._start(sub, bootstrap, since))

    def on_unsubscribe(self, connection: ServerConnection, frame: Frame) -> None:
        """UNSUBSCRIBE: end a state or event subscription of this connection."""
        request = Unsubscribe.decode(frame.payload)
        box = self._boxes.get(connection)
        sub = None if box is None else box.subscriptions.get(request.subscription_id)
        if box is None or sub is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_SUBSCRIPTION,
                f"no subscription {request.subscription_id} on this connection",
                Opcode.UNSUBSCRIBE,
            )
        self._remove(sub)
        box.add_message(Ok(0), frame.stream_id)
        box.flush()

    def on_subscribe_events(self, connection: ServerConnection, frame: Frame) -> None:
        """SUBSCRIBE_EVENTS: deliver an event-stream kind's events from a sequence number."""
        request = SubscribeEvents.decode(frame.payload)
        kind = self.server.catalog.get(request.kind_id, Opcode.SUBSCRIBE_EVENTS)
        if not kind.event_stream:
            raise ProtocolError(
                ErrorCode.NOT_EVENT_STREAM,
                f"kind {kind.name!r} keeps no event stream (register it with event_stream)",
                Opcode.SUBSCRIBE_EVENTS,
            )
        box = self._new_subscription_box(connection, frame.stream_id, Opcode.SUBSCRIBE_EVENTS)
        sub = EventSubscription(box, frame.stream_id, kind.kind_id)
        box.subscriptions[sub.sub_id] = sub
        recorded = kind.event_seq
        self._when_settled(lambda: self._start_events(sub, kind, request.from_seq, recorded))

    def _new_subscription_box(self, connection: ServerConnection, sub_id: int, op: int) -> Outbox:
        """The connection's outbox, once `sub_id` is known to be free on it."""
        box = self._box(connection)
        if sub_id in box.subscriptions:
            raise malformed(
                f"subscription {sub_id} is already live on this connection: use another stream "
                "id, or UNSUBSCRIBE first",
                op,
            )
        limit = self.server.config.max_subscriptions
        if len(box.subscriptions) >= limit:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"this connection has {limit} live subscriptions, the most allowed "
                "(--max-subscriptions): UNSUBSCRIBE one first",
                op,
            )
        return box

    # starting ------------------------------------------------------------------------------------

    def _when_settled(self, start: Callable[[], None]) -> None:
        """Run `start` once every flush computed before now is in the table and has notified.

        A flush that is committing was computed before this subscription existed: the engine did
        not describe its changes for a kind nobody watched, and its events are numbered but not
        in the ring yet. Flushes computed from now on see the subscription.
        """
        engine = self.engine
        computed = engine.generation - 1
        if engine.notified_generation >= computed:
            start()
        else:
            engine.wait_notified(computed).add_done_callback(lambda _done: start())

    def _start(self, sub: StateSubscription, bootstrap: bool, since: int | None) -> None:
        """Reply OK with the committed seq, then bootstrap (a task) or go live."""
        if self._closed:
            return
        seq = self.engine.seq
        box = sub.box
        box.add_message(Ok(seq), sub.sub_id)  # even when unsubscribed meanwhile: it was asked
        box.flush()
        if sub.closed:
            return
        if not bootstrap:
            self._release(sub)
            return
        if since is not None and 0 < since <= seq and since >= self.engine.compacted_seq:
            bootstrap_task = self._bootstrap(sub, BootstrapMode.DELTA, since)
        else:
            # the engine counts alive entities: a full bootstrap needs no counting pass
            self._begin(sub, BootstrapMode.FULL, sub.kind.alive)
            bootstrap_task = self._bootstrap(sub, BootstrapMode.FULL, 0)
        sub.task = asyncio.get_running_loop().create_task(
            bootstrap_task, name=f"convergedb-bootstrap-{sub.sub_id}"
        )

    def _begin(self, sub: StateSubscription, mode: BootstrapMode, count: int) -> None:
        """Send BOOTSTRAP_BEGIN; live changes may follow it."""
        sub.box.add_message(BootstrapBegin(sub.kind.kind_id, mode, count), sub.sub_id)
        sub.box.flush()
        self._release(sub)

    def _release(self, sub: StateSubscription) -> None:
        """The subscription may send live changes (after its OK, or its BOOTSTRAP_BEGIN)."""
        sub.held = False
        if sub.has_backlog():
            self._schedule_drain(sub.box)
        else:
            self._go_live(sub)

    @staticmethod
    def _go_live(sub: StateSubscription) -> None:
        """Send changes live again when nothing merged is left to send and nothing holds it."""
        if not sub.held and not sub.box.merging and not sub.has_backlog():
            sub.pending = None
            sub.draining = []
            sub.drain_pos = 0

    def _start_events(
        self, sub: EventSubscription, kind: KindState, from_seq: int, recorded: int
    ) -> None:
        """Check `from_seq` against the ring, reply OK with the first seq, replay, go live.

        `recorded` is the kind's last event seq when the request arrived; every event up to it
        has reached the ring by now (or was recorded before this server started).
        """
        if self._closed:
            return
        box = sub.box
        ring = self.rings.ring(kind.kind_id, recorded + 1)
        start = recorded + 1 if from_seq == 0 else from_seq
        if sub.closed:  # unsubscribed before it started: the request still gets its answer
            box.add_message(Ok(start), sub.sub_id)
            box.flush()
            return
        # held by the ring, or numbered by a flush still committing, or exactly the next one
        if not ring.first_seq <= start <= max(ring.next_seq, kind.event_seq + 1):
            self._remove(sub)
            if start > kind.event_seq + 1:
                reason = (
                    f"event {start} is beyond the last event of {kind.name!r} ({kind.event_seq})"
                )
            else:
                reason = (
                    f"event {start} of {kind.name!r} is no longer kept: the ring holds "
                    f"{ring.first_seq}..{ring.next_seq - 1}; subscribe from 0 for new events"
                )
            error = Error(ErrorCode.EVENTS_TRUNCATED, Opcode.SUBSCRIBE_EVENTS, reason)
            box.add_message(error, sub.sub_id)
            box.flush()
            return
        sub.ring = ring
        sub.cursor = start
        sub.held = False
        sub.lagging = start < ring.next_seq or box.merging
        self._event_subs.setdefault(kind.kind_id, []).append(sub)
        box.add_message(Ok(start), sub.sub_id)
        box.flush()
        if sub.lagging:
            self._schedule_drain(box)

    # bootstrap -----------------------------------------------------------------------------------

    async def _bootstrap(self, sub: StateSubscription, mode: BootstrapMode, since: int) -> None:
        """(For a delta: count, send BOOTSTRAP_BEGIN, go live.) Send the entities chunk by
        chunk, then BOOTSTRAP_END with the number sent."""
        box = sub.box
        kind = sub.kind
        delta = mode is BootstrapMode.DELTA
        tombstones: dict[bytes, Entity] = {}
        try:
            if delta:
                count, tombstones = await self._count_delta(sub, since)
                if sub.closed:
                    return
                if self.engine.compacted_seq > since:
                    # compaction removed a deletion newer than `since` while the count ran: a
                    # delta could miss it, so this becomes a full bootstrap
                    delta, mode, count, tombstones = False, BootstrapMode.FULL, kind.alive, {}
                self._begin(sub, mode, count)
            sent = 0
            chunks = self._entity_chunks(kind, CHUNK)
            while True:
                await self._writable(box)
                if sub.closed:
                    return
                chunk = next(chunks, None)
                if chunk is None:
                    break
                sent += self._add_bootstrap_chunk(sub, chunk, delta, since, tombstones)
                box.flush()
                await asyncio.sleep(0)
            # tombstones the counting pass saw but compaction removed since: still deletions
            for eid, entity in tombstones.items():
                if self.engine.committed(kind, eid) is not None:
                    continue  # re-created since: its live changes tell the subscriber
                box.add(prepare(_DELETED, deleted_payload(kind.kind_id, eid, entity, b"", b"")),
                        sub.sub_id, sub.crc)  # fmt: skip
                sent += 1
            box.add_message(BootstrapEnd(kind.kind_id, sent), sub.sub_id)
            box.flush()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bootstrap of %r for %s failed", kind.name, box.connection.peer)
            if not sub.closed:
                self._remove(sub)
                error = Error(ErrorCode.INTERNAL, Opcode.SUBSCRIBE, "the bootstrap failed")
                box.add_message(error, sub.sub_id)
                box.flush()
        finally:
            sub.task = None

    async def _count_delta(
        self, sub: StateSubscription, since: int
    ) -> tuple[int, dict[bytes, Entity]]:
        """The frames a delta bootstrap will send (entities changed after `since`), and the
        tombstones among them. Runs in steps, yielding to the loop between them; the
        subscription is held meanwhile (its live changes are merged)."""
        count = 0
        tombstones: dict[bytes, Entity] = {}
        for chunk in self._entity_chunks(sub.kind, COUNT_CHUNK):
            for eid, entity in chunk:
                if entity is not None and entity.seq > since:
                    count += 1
                    if not entity.sources:
                        tombstones[eid] = entity
            await asyncio.sleep(0)
            if sub.closed:
                break
        return count, tombstones

    def _entity_chunks(self, kind: KindState, size: int) -> Iterator[EntityChunk]:
        """The kind's entities in chunks, each read when the chunk is taken.

        In memory: a snapshot of the key list, each entity looked up as its chunk is taken
        (None if it is gone since). On disk: a scan of the store, one short read transaction
        per chunk.
        """
        entities = kind.entities
        if entities is not None:
            keys = list(entities)
            get = entities.get
            for start in range(0, len(keys), size):
                yield [(eid, get(eid)) for eid in keys[start : start + size]]
            return
        store = self.server.store
        after: bytes | None = None
        while rows := store.scan_entities(kind.kind_id, after, size):
            yield rows
            after = rows[-1][0]

    @staticmethod
    def _add_bootstrap_chunk(
        sub: StateSubscription,
        chunk: EntityChunk,
        delta: bool,
        since: int,
        tombstones: dict[bytes, Entity],
    ) -> int:
        """Add one chunk's bootstrap frames (current states, no metadata); how many."""
        box = sub.box
        kind = sub.kind
        kind_id = kind.kind_id
        all_fields = kind.codec.all_fields_mask
        sub_id = sub.sub_id
        crc = sub.crc
        added = 0
        for eid, entity in chunk:
            if entity is None:
                continue
            if delta:
                if entity.seq <= since:
                    continue
                tombstones.pop(eid, None)
                if not entity.sources:
                    payload = deleted_payload(kind_id, eid, entity, b"", b"")
                    box.add(prepare(_DELETED, payload), sub_id, crc)
                    added += 1
                    continue
            elif not entity.sources:
                continue
            row = kind.current_row(entity)
            head = STATE_HEAD.pack(
                kind_id,
                eid,
                _BOOTSTRAP,
                entity.version,
                entity.sources,
                all_fields,
                entity.seq,
                len(row),
            )
            box.add(prepare(_STATE, b"".join((head, row, _NO_PREVIOUS, EMPTY_META))), sub_id, crc)
            added += 1
        return added

    @staticmethod
    async def _writable(box: Outbox) -> None:
        """Wait while the connection's socket is backed up."""
        while box.paused and not box.closed:
            await box.writable.wait()

    # live fan-out --------------------------------------------------------------------------------

    def _on_commit(self, seq: int, changes: list[Change]) -> None:
        """After a flush: send each watched kind's changes to its subscribers."""
        try:
            touched: list[Outbox] = []
            by_kind = self._by_kind
            for kind, group in groupby(changes, _CHANGE_KIND):
                subs = by_kind.get(kind.kind_id)
                if subs:
                    self._fan_out(list(group), subs, touched)
            for box in touched:
                self.notifications += box.flush()
        except Exception:  # a fan-out bug must not stop the flush loop
            log.exception("notifying the changes of flush %d failed", seq)

    def _fan_out(
        self, changes: list[Change], subs: list[StateSubscription], touched: list[Outbox]
    ) -> None:
        """One kind's changes of one flush to its subscribers: encoded once, addressed to each."""
        masks = [change.changed_fields() for change in changes]
        plain: list[Prepared] | None = None
        with_previous: list[Prepared] | None = None
        for sub in subs:
            if sub.pending is not None:
                sub.merge(changes, masks)
                self._schedule_drain(sub.box)  # no-op while paused or already scheduled
                continue
            if sub.include_previous:
                if with_previous is None:
                    with_previous = prepare_changes(changes, masks, True, plain)
                frames = with_previous
            else:
                if plain is None:
                    plain = prepare_changes(changes, masks, False)
                frames = plain
            box = sub.box
            if not box.count:
                touched.append(box)
            room = self._room(box)
            if len(frames) <= room:
                box.add_many(frames, sub.sub_id, sub.crc)
                continue
            box.add_many(frames[:room], sub.sub_id, sub.crc)
            self._start_merging(box)
            sub.merge(changes[room:], masks[room:])

    def _room(self, box: Outbox) -> int:
        """Frames the connection may still be given before its changes are merged."""
        if not box.paused:
            return _UNLIMITED
        return max(0, self._buffer - box.queued - box.count)

    def _start_merging(self, box: Outbox) -> None:
        """The connection's socket is backed up past the buffer: merge, stop writing."""
        if box.merging:
            return
        box.merging = True
        for sub in box.subscriptions.values():
            if isinstance(sub, StateSubscription):
                if sub.pending is None:
                    sub.pending = {}
            else:
                sub.lagging = True
        log.info(
            "%s is backed up (%d frames queued): merging its notifications",
            box.connection.peer,
            box.queued + box.count,
        )

    # event streams -------------------------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        """After a flush: keep its events in their rings and send them to the subscribers."""
        try:
            touched: list[Outbox] = []
            for kind_id, (ring, frames) in self.rings.record(events).items():
                subs = self._event_subs.get(kind_id)
                if subs:
                    self._deliver_events(ring, frames, list(subs), touched)
            for box in touched:
                box.flush()
        except Exception:  # a delivery bug must not stop the flush loop
            log.exception("delivering events failed")

    def _deliver_events(
        self,
        ring: EventRing,
        frames: list[Prepared],
        subs: list[EventSubscription],
        touched: list[Outbox],
    ) -> None:
        """New events of one kind to its subscribers (lagging ones catch up from the ring)."""
        first_new = ring.next_seq - len(frames)
        for sub in subs:
            if sub.lagging or sub.held:
                if not sub.held and sub.cursor < ring.first_seq:
                    self._truncate(sub)
                continue
            box = sub.box
            skip = sub.cursor - first_new
            if skip < 0:  # cannot happen; never skip an event: let the drain feed it
                sub.lagging = True
                self._schedule_drain(box)
                continue
            todo = frames[skip:] if skip else frames
            if not todo:
                continue
            if not box.count:
                touched.append(box)
            room = self._room(box)
            if len(todo) > room:
                todo = todo[:room]
                self._start_merging(box)
            box.add_many(todo, sub.sub_id, sub.crc)
            sub.cursor += len(todo)

    def _truncate(self, sub: EventSubscription) -> None:
        """The ring overwrote events the subscriber has not received: end its subscription."""
        box = sub.box
        ring = sub.ring
        first = ring.first_seq if ring is not None else 0
        self._remove(sub)
        log.info(
            "%s: event subscription %d fell out of the ring (at %d, ring starts at %d)",
            box.connection.peer,
            sub.sub_id,
            sub.cursor,
            first,
        )
        message = (
            f"the subscriber fell behind: event {sub.cursor} is no longer kept (the ring starts "
            f"at {first}); subscribe again"
        )
        box.add_message(Error(ErrorCode.EVENTS_TRUNCATED, Opcode.SUBSCRIBE_EVENTS, message),
                        sub.sub_id)  # fmt: skip
        box.flush()

    # draining backed-up subscribers --------------------------------------------------------------

    def _schedule_drain(self, box: Outbox) -> None:
        if box.drain_handle is None and not box.paused and not box.closed:
            box.drain_handle = asyncio.get_running_loop().call_soon(self._drain, box)

    def _drain(self, box: Outbox) -> None:
        """Send one chunk of what backed-up subscriptions are owed; again later if more."""
        box.drain_handle = None
        if box.paused or box.closed or box.closing:
            return
        budget = CHUNK
        for sub in list(box.subscriptions.values()):
            if budget <= 0:
                break
            if isinstance(sub, StateSubscription):
                budget -= self._drain_state(sub, budget)
            else:
                budget -= self._drain_events(sub, budget)
        self.notifications += box.flush()
        if any(sub.has_backlog() for sub in box.subscriptions.values()):
            self._schedule_drain(box)
        elif box.merged_sent:
            log.info("%s caught up: %d merged notifications", box.connection.peer, box.merged_sent)
            box.merged_sent = 0

    def _drain_state(self, sub: StateSubscription, budget: int) -> int:
        """Add up to `budget` merged frames of a state subscription; how many."""
        if sub.held or sub.pending is None:
            return 0
        box = sub.box
        added = 0
        while added < budget:
            if sub.drain_pos >= len(sub.draining):
                if not sub.pending:
                    sub.draining = []
                    sub.drain_pos = 0
                    self._go_live(sub)  # caught up
                    break
                sub.draining = list(sub.pending.values())
                sub.pending = {}
                sub.drain_pos = 0
            entry = sub.draining[sub.drain_pos]
            sub.draining[sub.drain_pos] = None  # let its rows go as soon as it is sent
            sub.drain_pos += 1
            assert entry is not None
            frame = sub.merged_frame(entry)
            if frame is not None:
                box.add(frame, sub.sub_id, sub.crc)
                added += 1
        box.merged_sent += added
        return added

    def _drain_events(self, sub: EventSubscription, budget: int) -> int:
        """Add up to `budget` events a lagging event subscription is owed; how many."""
        ring = sub.ring
        if sub.held or not sub.lagging or ring is None:
            return 0
        if sub.cursor < ring.first_seq:
            self._truncate(sub)
            return 0
        frames = ring.since(sub.cursor, budget)
        sub.box.add_many(frames, sub.sub_id, sub.crc)
        sub.cursor += len(frames)
        if sub.cursor >= ring.next_seq and not sub.box.merging:
            sub.lagging = False
        return len(frames)

    # flow control --------------------------------------------------------------------------------

    def _box(self, connection: ServerConnection) -> Outbox:
        box = self._boxes.get(connection)
        if box is None:
            box = self._boxes[connection] = Outbox(connection)
        return box

    def pause(self, connection: ServerConnection) -> None:
        """The connection's socket is backed up (the transport called pause_writing)."""
        box = self._box(connection)
        box.paused = True
        box.queued = 0
        box.writable.clear()
        if box.watchdog is None:
            box.last_progress = time.monotonic()
            box.accepted_mark = box.accepted()
            self._arm_watchdog(box)

    def resume(self, connection: ServerConnection) -> None:
        """The connection's socket drained (the transport called resume_writing)."""
        box = self._boxes.get(connection)
        if box is None:
            return
        box.paused = False
        box.queued = 0
        box.merging = False
        box.writable.set()
        if box.watchdog is not None and not box.slow_closed:
            box.watchdog.cancel()
            box.watchdog = None
        backlog = False
        for sub in box.subscriptions.values():
            if sub.has_backlog():
                backlog = True
            elif isinstance(sub, StateSubscription):
                self._go_live(sub)
        if backlog:
            self._schedule_drain(box)

    def _arm_watchdog(self, box: Outbox) -> None:
        interval = max(self._timeout / 4, 0.01)
        box.watchdog = asyncio.get_running_loop().call_later(interval, self._check_progress, box)

    def _check_progress(self, box: Outbox) -> None:
        """The watchdog of a backed-up connection: has its socket taken anything lately?"""
        box.watchdog = None
        transport = box.connection.transport
        if box.closed or transport is None:
            return
        now = time.monotonic()
        accepted = box.accepted()
        if accepted > box.accepted_mark:
            box.accepted_mark = accepted
            box.last_progress = now
        elif box.slow_closed:
            if now - box.last_progress >= max(self._timeout, ABORT_GRACE_S):
                log.info("%s still reads nothing: aborting its connection", box.connection.peer)
                transport.abort()
                return
        elif now - box.last_progress >= self._timeout:
            self._close_slow(box)
            box.last_progress = now
        if box.paused or box.slow_closed:
            self._arm_watchdog(box)

    def _close_slow(self, box: Outbox) -> None:
        """Close a connection that read nothing for the subscriber timeout (SLOW_SUBSCRIBER)."""
        box.slow_closed = True
        self.slow_closes += 1
        for sub in list(box.subscriptions.values()):
            self._remove(sub)
        connection = box.connection
        log.warning(
            "%s read nothing for %g s with output pending: closing it (SLOW_SUBSCRIBER)",
            connection.peer,
            self._timeout,
        )
        message = f"the connection read nothing for {self._timeout:g} s while output was pending"
        connection.send_error(ProtocolError(ErrorCode.SLOW_SUBSCRIBER, message), 0)

    # ending --------------------------------------------------------------------------------------

    def _remove(self, sub: StateSubscription | EventSubscription) -> None:
        """End one subscription: nothing more is sent for it."""
        if sub.closed:
            return
        sub.closed = True
        sub.box.subscriptions.pop(sub.sub_id, None)
        if isinstance(sub, StateSubscription):
            subs = self._by_kind.get(sub.kind.kind_id)
            if subs is not None:
                subs.remove(sub)
                if not subs:
                    del self._by_kind[sub.kind.kind_id]
            sub.kind.watchers -= 1
            if sub.task is not None:
                sub.task.cancel()
            sub.pending = None
            sub.draining = []
        else:
            event_subs = self._event_subs.get(sub.kind_id)
            if event_subs is not None and sub in event_subs:
                event_subs.remove(sub)
                if not event_subs:
                    del self._event_subs[sub.kind_id]
        sub.box.writable.set()  # a bootstrap waiting on the socket notices and ends

    def drop(self, connection: ServerConnection) -> None:
        """The connection is gone: end its subscriptions."""
        box = self._boxes.pop(connection, None)
        if box is None:
            return
        for sub in list(box.subscriptions.values()):
            self._remove(sub)
        box.closed = True
        box.writable.set()
        for handle in (box.watchdog, box.drain_handle):
            if handle is not None:
                handle.cancel()
        box.watchdog = box.drain_handle = None

    def close(self) -> None:
        """The server stops: no more bootstraps or catch-ups.

        Watchdogs keep running, so that a connection that reads nothing cannot hold the
        shutdown up for ever (it is closed with SLOW_SUBSCRIBER, then aborted).
        """
        self._closed = True
        for box in self._boxes.values():
            if box.drain_handle is not None:
                box.drain_handle.cancel()
                box.drain_handle = None
            for sub in box.subscriptions.values():
                if isinstance(sub, StateSubscription) and sub.task is not None:
                    sub.task.cancel()
        with contextlib.suppress(ValueError):
            self.engine.commit_listeners.remove(self._on_commit)
        with contextlib.suppress(ValueError):
            self.engine.event_listeners.remove(self._on_events)
