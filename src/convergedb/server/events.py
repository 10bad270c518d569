"""Event streams: the bounded ring of recent events of each event-stream kind (SPEC §8).

The engine records one event per ASSERT / PATCH / RETRACT on an event-stream kind (and per retract
the server synthesises) and hands each flush's events, numbered, to the subscription hub once the
flush has committed. The hub appends them here: each event is encoded ONCE into an EVENT payload
and kept as a `Prepared` frame, ready to be addressed to any number of event subscribers (only the
12-byte header differs between them, see `frame_header`). The ring keeps the last `capacity`
events of its kind; an event subscription is a cursor into it, so a subscriber that falls behind
costs no memory of its own until the ring overwrites the events it has not received yet.

The ring starts empty at each server start: events before it are gone (`EVENTS_TRUNCATED`), the
sequence numbers go on from the stored counter.

Prepared frames live here because the event ring is their first user; the state fan-out in
`subscriptions.py` uses them too.
"""

from __future__ import annotations

import struct
from binascii import crc_hqx
from collections import deque
from collections.abc import Iterable
from itertools import islice
from typing import Final, NamedTuple

from ..limits import PROTOCOL_VERSION
from ..protocol.codes import Opcode
from .engine import Event

HEADER: Final = struct.Struct("<BBHHIH")
"""A frame header: version, flags, stream_id, opcode, payload_len, crc16 (protocol.md)."""
_HEADER_BODY: Final = struct.Struct("<BBHHI")
"""The bytes the header CRC covers."""
EVENT_HEAD: Final = struct.Struct("<HQBBB32sQI")
"""EVENT: kind_id, seq, source_id, op, cause, eid, mask, data length (then data, meta)."""
EMPTY_META: Final = b"\x00\x00"
_U16: Final = struct.Struct("<H")
_EVENT: Final = int(Opcode.EVENT)


class Prepared(NamedTuple):
    """A server frame encoded once for every subscriber: its payload, and what its header needs.

    A header's CRC-16/XMODEM is linear in the header bytes (init 0, no final xor), so the CRC of
    a header on stream S is `crc_without_stream ^ stream_crc(S)`: addressing a prepared frame to
    a subscriber costs one `struct.pack`, not a CRC over the header.
    """

    opcode: int
    size: int
    """The payload's length."""
    crc: int
    """The header CRC with stream id 0."""
    payload: bytes


def prepare(opcode: int, payload: bytes) -> Prepared:
    """A prepared frame for `payload` (CRC of its header on stream 0 computed once)."""
    size = len(payload)
    return Prepared(
        opcode, size, crc_hqx(_HEADER_BODY.pack(PROTOCOL_VERSION, 0, 0, opcode, size), 0), payload
    )


def stream_crc(stream_id: int) -> int:
    """What a stream id contributes to a header CRC (XOR it with `Prepared.crc`)."""
    return crc_hqx(_HEADER_BODY.pack(0, 0, stream_id, 0, 0), 0)


def frame_header(frame: Prepared, stream_id: int, crc: int, flags: int = 0) -> bytes:
    """The header of `frame` on `stream_id`, whose `stream_crc` is `crc`.

    `flags` must be 0 or accounted for by the caller's `crc` (server notifications use 0).
    """
    return HEADER.pack(
        PROTOCOL_VERSION, flags, stream_id, frame.opcode, frame.size, frame.crc ^ crc
    )


def meta_tail(meta: bytes) -> bytes:
    """The metadata tail of a notification: u16 length + bytes (`00 00` when empty)."""
    return _U16.pack(len(meta)) + meta if meta else EMPTY_META


def encode_event(event: Event) -> bytes:
    """The EVENT payload of one recorded operation (byte for byte `messages.Event.encode()`)."""
    data = event.data
    head = EVENT_HEAD.pack(
        event.kind.kind_id,
        event.seq,
        event.source_id,
        event.op,
        event.cause,
        event.eid,
        event.mask,
        len(data),
    )
    return b"".join((head, data, meta_tail(event.meta)))


class EventRing:
    """The last `capacity` events of one kind, as prepared EVENT frames, oldest first.

    Sequence numbers in the ring are contiguous: event `seq` sits at index `seq - first_seq`.
    """

    __slots__ = ("events", "next_seq")

    def __init__(self, capacity: int, next_seq: int) -> None:
        self.events: deque[Prepared] = deque(maxlen=capacity)
        self.next_seq = next_seq
        """The seq the next appended event will carry (one past the newest delivered)."""

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (`next_seq` when the ring is empty)."""
        return self.next_seq - len(self.events)

    def append(self, events: Iterable[Event]) -> list[Prepared]:
        """Encode and keep `events` (of this kind, in seq order); return their frames."""
        frames = [prepare(_EVENT, encode_event(event)) for event in events]
        if frames:
            self.events.extend(frames)
            # the events of a kind are numbered contiguously by the engine
            self.next_seq += len(frames)
        return frames

    def holds(self, seq: int) -> bool:
        """Whether a subscriber may start at `seq`: still held, or exactly the next one."""
        return self.first_seq <= seq <= self.next_seq

    def since(self, seq: int, limit: int) -> list[Prepared]:
        """Up to `limit` frames from event `seq` on (`seq` must be `holds`-valid)."""
        start = seq - self.first_seq
        return list(islice(self.events, start, start + limit))


class EventRings:
    """The ring of every event-stream kind that has one, by kind id."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.by_kind: dict[int, EventRing] = {}

    def ring(self, kind_id: int, next_seq: int) -> EventRing:
        """The kind's ring, made empty, expecting `next_seq`, if the kind has none yet."""
        ring = self.by_kind.get(kind_id)
        if ring is None:
            ring = self.by_kind[kind_id] = EventRing(self.capacity, next_seq)
        return ring

    def record(self, events: list[Event]) -> dict[int, tuple[EventRing, list[Prepared]]]:
        """Append one flush's events to their kinds' rings; per kind id, the ring and the new
        frames (in seq order)."""
        grouped: dict[int, list[Event]] = {}
        for event in events:
            grouped.setdefault(event.kind.kind_id, []).append(event)
        recorded = {}
        for kind_id, kind_events in grouped.items():
            ring = self.ring(kind_id, kind_events[0].seq)
            if ring.next_seq != kind_events[0].seq:
                # cannot happen while the engine numbers contiguously; never index a gapped ring
                ring.events.clear()
                ring.next_seq = kind_events[0].seq
            recorded[kind_id] = (ring, ring.append(kind_events))
        return recorded
