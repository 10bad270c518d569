"""Fuzzing a live server on the wire: random bytes and mutated frames (hypothesis), each input
on a fresh TCP connection to one real server, while a well-behaved client on another
connection keeps writing. Also `atheris` on the frame reader and the row validator, when it is
installed (tests/atheris_fuzz.py).

Each input is checked against a model of PROTOCOL.md, not only "the server did not crash":

- the header checks, in the protocol's order (CRC, version, payload size), computed here
  independently of `FrameReader`: a bad header is answered with its error and the closing
  flag, and nothing after it is answered;
- before CONNECT, frames are answered one by one, in order: PONG for a HEARTBEAT on a
  non-zero stream, CONNECTED or a closing error for CONNECT, and NOT_CONNECTED (closing) for
  anything else;
- once connected: every request on a non-zero stream gets a reply on its stream (of its own
  reply type, or an ERROR with a code that request can have), a request on stream 0 gets
  MALFORMED, an unknown opcode UNKNOWN_OPCODE, a rejected write an ERROR on stream 0 naming a
  write operation; nothing is INTERNAL, only subscriptions' streams carry notifications, and the
  connection stays open;
- every frame the server sends has a correct header and decodes.

A HEARTBEAT on stream 0xFFFF after each input is the barrier: its PONG means every earlier
frame was read. An input that ends inside a frame is completed with zero bytes (or cut back to
whole frames when the end falls inside a header), so that every input ends at a frame boundary.

At the end the well-behaved client's entities are exactly as it wrote them (QUERY), it was
told nothing it did not ask for, and the server logged no traceback.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import os
import struct
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import DrawFn, SearchStrategy

from convergedb import id_from_int, id_from_str
from convergedb.limits import HEADER_SIZE
from convergedb.protocol import (
    SERVER_CLOSING_FLAG,
    Assert,
    Batch,
    Connect,
    Connected,
    ConnectMode,
    CreateKind,
    EpochBegin,
    EpochEnd,
    Error,
    ErrorCode,
    FrameReader,
    GetKind,
    Heartbeat,
    KindInfo,
    ListKinds,
    Message,
    Opcode,
    Patch,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
    Subscribe,
    SubscribeEvents,
    SubscribeFlags,
    Sync,
    Unsubscribe,
    decode_message,
    encode_frame,
    encode_message,
)
from convergedb.schema.types import Field, FieldType, KindDef
from kinds import MATCH, PLAYER, Match, Player, Vec2
from server_fixture import ServerProcess, running_server
from strategies import kind_definitions
from wire_client import WireClient

pytestmark = pytest.mark.torture

LONG = os.environ.get("CONVERGEDB_TORTURE") == "long"
MUTATED_EXAMPLES = 5000 if LONG else 300
RANDOM_EXAMPLES = 1500 if LONG else 100
ATHERIS_RUNS = 200_000 if LONG else 20_000
MAX_PAYLOAD = 65536
FUZZ_TOKEN = "fz"
GOOD_TOKEN = "well-behaved-admin-secret"
GOOD_SOURCE = 30
GOOD_ENTITIES = 20
BARRIER = 0xFFFF
REPLY_TIMEOUT = 10.0
TRIED: Counter[str] = Counter()
"""Inputs sent to the live server, by test."""

# kinds, in the order the fixture registers them (user kinds of a new data dir start at 2)
FZ_PLAYER, FZ_MATCH, FZ_EVENTS, GOOD_KIND = 2, 3, 4, 5
KIND_DEFS = (
    KindDef("fz_player", PLAYER.definition.fields),
    KindDef("fz_match", MATCH.definition.fields),
    KindDef("fz_events", (Field(0, "n", FieldType.U32),), event_stream=True),
    KindDef("zz_well_behaved", PLAYER.definition.fields),
)

# --- what PROTOCOL.md says, as tables ------------------------------------------------------

REPLIES: dict[int, frozenset[Opcode]] = {
    Opcode.CONNECT: frozenset({Opcode.ERROR}),  # once connected
    Opcode.QUERY: frozenset({Opcode.QUERY_RESULT}),
    Opcode.SUBSCRIBE: frozenset({Opcode.OK}),
    Opcode.UNSUBSCRIBE: frozenset({Opcode.OK}),
    Opcode.SOURCE_EPOCH_BEGIN: frozenset({Opcode.OK}),
    Opcode.SOURCE_EPOCH_END: frozenset({Opcode.OK}),
    Opcode.SYNC: frozenset({Opcode.OK}),
    Opcode.SUBSCRIBE_EVENTS: frozenset({Opcode.OK}),
    Opcode.CREATE_KIND: frozenset({Opcode.KIND_INFO}),
    Opcode.GET_KIND: frozenset({Opcode.KIND_INFO}),
    Opcode.LIST_KINDS: frozenset({Opcode.KIND_LIST}),
    Opcode.HEARTBEAT: frozenset({Opcode.PONG}),
}
"""The reply of each request (an ERROR is allowed too, with the codes below)."""
REQUESTS = frozenset(REPLIES) - {Opcode.HEARTBEAT}
"""The opcodes that need a reply, hence a non-zero stream id (a HEARTBEAT on stream 0 is
answered by nothing)."""
WRITES = frozenset({Opcode.ASSERT, Opcode.RETRACT, Opcode.PATCH, Opcode.BATCH})
CLIENT_OPCODES = REQUESTS | WRITES | {Opcode.HEARTBEAT}
E = ErrorCode
REQUEST_ERRORS: dict[int, frozenset[ErrorCode]] = {
    Opcode.CONNECT: frozenset({E.MALFORMED, E.ALREADY_CONNECTED}),
    Opcode.QUERY: frozenset({E.MALFORMED, E.UNKNOWN_KIND}),
    Opcode.SUBSCRIBE: frozenset({E.MALFORMED, E.UNKNOWN_KIND, E.LIMIT_EXCEEDED}),
    Opcode.UNSUBSCRIBE: frozenset({E.MALFORMED, E.UNKNOWN_SUBSCRIPTION}),
    Opcode.SOURCE_EPOCH_BEGIN: frozenset({E.MALFORMED, E.READ_ONLY}),
    Opcode.SOURCE_EPOCH_END: frozenset({E.MALFORMED, E.READ_ONLY, E.EPOCH_NOT_OPEN}),
    Opcode.SYNC: frozenset({E.MALFORMED}),
    Opcode.SUBSCRIBE_EVENTS: frozenset(
        {E.MALFORMED, E.UNKNOWN_KIND, E.NOT_EVENT_STREAM, E.EVENTS_TRUNCATED, E.LIMIT_EXCEEDED}
    ),
    Opcode.CREATE_KIND: frozenset(
        {
            E.MALFORMED,
            E.INVALID_SCHEMA,
            E.SCHEMA_CONFLICT,
            E.RESERVED_NAME,
            E.READ_ONLY,
            E.LIMIT_EXCEEDED,
        }
    ),
    Opcode.GET_KIND: frozenset({E.MALFORMED, E.UNKNOWN_KIND, E.SCHEMA_CONFLICT, E.INVALID_SCHEMA}),
    Opcode.LIST_KINDS: frozenset({E.MALFORMED}),
    Opcode.HEARTBEAT: frozenset(),
}
WRITE_ERRORS = frozenset(
    {E.MALFORMED, E.INVALID_DATA, E.UNKNOWN_KIND, E.FORBIDDEN, E.READ_ONLY, E.LIMIT_EXCEEDED}
)
CONNECT_ERRORS = frozenset(
    {E.MALFORMED, E.AUTH_FAILED, E.FORBIDDEN, E.SOURCE_CONFLICT, E.NO_FREE_SOURCE, E.LIMIT_EXCEEDED}
)
NOTIFICATIONS = frozenset(
    {Opcode.STATE, Opcode.DELETED, Opcode.BOOTSTRAP_BEGIN, Opcode.BOOTSTRAP_END, Opcode.EVENT}
)
SILENCE_TOLERANCE_MS = 5000
"""A connection granted a deadline below this may be closed for silence during a check."""


# --- the reference: frames as the client sent them -----------------------------------------


@dataclass(frozen=True)
class Sent:
    """One frame of an input, as a reference parser reads the bytes (not the server's)."""

    stream: int
    opcode: int
    header_error: tuple[ErrorCode, int] | None
    """(code, op) of the closing error its header gets, if any."""


def header_error(header: bytes, max_payload: int) -> tuple[ErrorCode, int] | None:
    """PROTOCOL.md's header checks, first failure wins: CRC, version, payload size."""
    version, _flags, _stream, opcode, length, crc = struct.unpack("<BBHHIH", header)
    if binascii.crc_hqx(header[:10], 0) != crc:
        return ErrorCode.BAD_FRAME, 0
    if version != 1:
        return ErrorCode.UNSUPPORTED_VERSION, 0
    if length > max_payload:
        return ErrorCode.PAYLOAD_TOO_LARGE, opcode
    return None


def complete(data: bytes) -> bytes:
    """`data` made to end at a frame boundary: a last payload cut short is filled with zeros,
    a last header cut short is dropped. Stops looking at the first bad header."""
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        header = data[pos : pos + HEADER_SIZE]
        if header_error(header, MAX_PAYLOAD) is not None:
            return data
        length = struct.unpack_from("<I", header, 6)[0]
        end = pos + HEADER_SIZE + length
        if end > len(data):
            return data + bytes(end - len(data))
        pos = end
    return data[:pos]


def frames_of(data: bytes) -> list[Sent]:
    """The frames of a completed input, up to and including the first bad header."""
    sent = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        header = data[pos : pos + HEADER_SIZE]
        _v, _f, stream, opcode, length, _crc = struct.unpack("<BBHHIH", header)
        error = header_error(header, MAX_PAYLOAD)
        sent.append(Sent(stream, opcode, error))
        if error is not None:
            break
        pos += HEADER_SIZE + length
    return sent


# --- what came back ------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    flags: int
    stream: int
    opcode: int
    message: Message

    @property
    def closing(self) -> bool:
        return bool(self.flags & SERVER_CLOSING_FLAG)

    def is_error(self, code: ErrorCode | None = None) -> bool:
        return isinstance(self.message, Error) and (code is None or self.message.code == code)


@dataclass
class Exchange:
    """Everything the server sent back on one connection, and whether it closed it."""

    frames: list[Received] = field(default_factory=list)
    eof: bool = False
    error: Exception | None = None
    """Why a frame the server sent could not be read (a bad header, a payload that does not
    decode)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def read_replies(reader: asyncio.StreamReader, exchange: Exchange) -> None:
    """Collect the server's frames; each must have a correct header and decode."""
    frames = FrameReader(max_payload=0xFFFF_FFFF)
    try:
        while data := await reader.read(65536):
            for frame in frames.feed(data):
                message = decode_message(frame.opcode, frame.payload)
                exchange.frames.append(
                    Received(frame.flags, frame.stream_id, frame.opcode, message)
                )
            exchange.changed.set()
    except (ConnectionError, OSError):
        pass
    except Exception as exc:
        exchange.error = exc
    exchange.eof = True  # not when cancelled: then the test ended the exchange, not the server
    exchange.changed.set()


# --- the model: what the server must answer ------------------------------------------------


@dataclass
class Expectation:
    """What one input must get, once the exact pre-connect phase has been checked."""

    closing: tuple[ErrorCode, int, int] | None = None
    """(code, op, stream) of the error that must end the connection, if any."""
    needed: Counter[int] = field(default_factory=Counter)
    """Replies each non-zero stream must get."""
    types: dict[int, set[int]] = field(default_factory=dict)
    codes: dict[int, set[ErrorCode]] = field(default_factory=dict)
    stream0: set[tuple[ErrorCode, int | None]] = field(default_factory=set)
    """(code, op) an ERROR on stream 0 may have; op None: any (a BATCH's sub-operation)."""
    tolerate_silence_close: bool = False
    first_post_connect: int = 0
    """Index in the received frames where the concurrent phase starts."""


class ModelViolation(AssertionError):
    pass


def expect(condition: bool, what: str, exchange: Exchange) -> None:
    if not condition:
        frames = "\n  ".join(repr(f) for f in exchange.frames[:40])
        raise ModelViolation(f"{what}\n  eof={exchange.eof}\n  {frames}")


def pre_connect(sent: list[Sent], exchange: Exchange) -> tuple[int, Expectation] | None:
    """Check the pre-connect phase frame by frame. Returns (index of the first frame sent
    after CONNECTED, expectation so far), or None if the phase is not complete yet (more
    replies to wait for). Raises ModelViolation."""
    got = exchange.frames
    r = 0
    for index, frame in enumerate(sent):
        if frame.header_error is not None:
            code, op = frame.header_error
            return index, Expectation(closing=(code, op, 0), first_post_connect=r)
        if frame.opcode == Opcode.HEARTBEAT:
            if frame.stream:
                if r >= len(got):
                    return None
                reply = got[r]
                expect(
                    reply.opcode == Opcode.PONG and reply.stream == frame.stream,
                    f"HEARTBEAT before CONNECT: PONG on {frame.stream}",
                    exchange,
                )
                r += 1
            continue
        if frame.opcode != Opcode.CONNECT:
            closing = (E.NOT_CONNECTED, frame.opcode, frame.stream)
            return index, Expectation(closing=closing, first_post_connect=r)
        if frame.stream == 0:
            closing = (E.MALFORMED, Opcode.CONNECT, 0)
            return index, Expectation(closing=closing, first_post_connect=r)
        if r >= len(got):
            return None
        reply = got[r]
        expect(reply.stream == frame.stream, "the CONNECT reply is on its stream", exchange)
        if isinstance(reply.message, Connected):
            deadline = reply.message.liveness_deadline_ms
            expect(not reply.closing, "CONNECTED does not close", exchange)
            expectation = Expectation(
                tolerate_silence_close=deadline < SILENCE_TOLERANCE_MS, first_post_connect=r + 1
            )
            return index + 1, expectation
        expect(reply.is_error() and reply.closing, "a refused CONNECT closes", exchange)
        assert isinstance(reply.message, Error)
        expect(reply.message.code in CONNECT_ERRORS, "a CONNECT error code", exchange)
        closing = (reply.message.code, Opcode.CONNECT, frame.stream)
        return index, Expectation(closing=closing, first_post_connect=r)
    return len(sent), Expectation(first_post_connect=r)


def post_connect(sent: list[Sent], expectation: Expectation) -> None:
    """Fill in what each frame sent after CONNECTED may and must get."""
    for frame in sent:
        if frame.header_error is not None:
            code, op = frame.header_error
            expectation.closing = (code, op, 0)
            return
        opcode, stream = frame.opcode, frame.stream
        if opcode not in CLIENT_OPCODES:
            if stream == 0:
                expectation.stream0.add((E.UNKNOWN_OPCODE, opcode))
            else:
                _allow(expectation, stream, {Opcode.ERROR}, {E.UNKNOWN_OPCODE})
            continue
        if opcode in WRITES:
            for code in WRITE_ERRORS:
                expectation.stream0.add((code, None if opcode == Opcode.BATCH else opcode))
            if opcode == Opcode.BATCH:
                expectation.stream0.add((E.MALFORMED, Opcode.BATCH))
            continue
        if stream == 0:
            if opcode in REQUESTS:
                expectation.stream0.add((E.MALFORMED, opcode))
            continue  # a HEARTBEAT on stream 0 gets nothing
        _allow(expectation, stream, {*REPLIES[opcode], Opcode.ERROR}, REQUEST_ERRORS[opcode])
        if opcode in (Opcode.SUBSCRIBE, Opcode.SUBSCRIBE_EVENTS):
            expectation.types[stream] |= NOTIFICATIONS


def _allow(expectation: Expectation, stream: int, types: set[int], codes: set[ErrorCode]) -> None:
    expectation.needed[stream] += 1
    expectation.types.setdefault(stream, set()).update(types)
    expectation.codes.setdefault(stream, set()).update(codes)


def replies_on(frames: list[Received], stream: int) -> int:
    return sum(1 for f in frames if f.stream == stream and f.opcode not in NOTIFICATIONS)


def answered(data: bytes, exchange: Exchange) -> bool:
    """Whether every reply the input must get has arrived (or the connection ended)."""
    if exchange.eof:
        return True
    sent = frames_of(data)
    phase = pre_connect(sent, exchange)
    if phase is None:
        return False
    index, expectation = phase
    if expectation.closing is not None:
        return False  # only the end of the connection completes it
    post_connect(sent[index:], expectation)
    if expectation.closing is not None:
        return False
    later = exchange.frames[expectation.first_post_connect :]
    return all(replies_on(later, s) >= n for s, n in expectation.needed.items())


def check(data: bytes, exchange: Exchange) -> None:
    """Everything the server sent for `data` (a whole exchange) follows the model."""
    sent = frames_of(data)
    phase = pre_connect(sent, exchange)
    expect(phase is not None, "every pre-connect frame is answered", exchange)
    assert phase is not None
    index, expectation = phase
    if expectation.closing is None:
        post_connect(sent[index:], expectation)
    later = exchange.frames[expectation.first_post_connect :]
    for position, frame in enumerate(later):
        expect(not frame.is_error(E.INTERNAL), "no INTERNAL error", exchange)
        if frame.closing:
            expect(position == len(later) - 1, "nothing follows a closing frame", exchange)
            continue
        check_concurrent_frame(frame, expectation, exchange)
    closing = expectation.closing
    if closing is None:
        silent_close = expectation.tolerate_silence_close and not any(f.closing for f in later)
        expect(not exchange.eof or silent_close, "the connection stays open", exchange)
        if not exchange.eof:
            for stream, count in expectation.needed.items():
                expect(replies_on(later, stream) >= count, f"{count} replies on {stream}", exchange)
        return
    code, op, stream = closing
    expect(exchange.eof, f"{code.name} closes the connection", exchange)
    last = exchange.frames[-1] if exchange.frames else None
    if last is None or not last.closing:
        expect(expectation.tolerate_silence_close, f"a closing {code.name}", exchange)
        return
    assert isinstance(last.message, Error)
    expect(
        (last.message.code, last.message.op, last.stream) == (code, op, stream),
        f"the closing error is {code.name} op {op:#x} on stream {stream}",
        exchange,
    )


def check_concurrent_frame(frame: Received, expectation: Expectation, exchange: Exchange) -> None:
    if frame.stream == 0:
        expect(frame.is_error(), "stream 0 carries only errors", exchange)
        assert isinstance(frame.message, Error)
        key = (frame.message.code, frame.message.op)
        wildcard = (frame.message.code, None)
        expect(
            key in expectation.stream0 or wildcard in expectation.stream0,
            f"an asynchronous {frame.message.code.name} op {frame.message.op:#x} "
            "that some frame sent can cause",
            exchange,
        )
        return
    types = expectation.types.get(frame.stream, set())
    expect(frame.opcode in types, f"a {Opcode(frame.opcode).name} on {frame.stream}", exchange)
    if isinstance(frame.message, Error):
        codes = expectation.codes.get(frame.stream, set())
        expect(
            frame.message.code in codes, f"{frame.message.code.name} on {frame.stream}", exchange
        )


# --- the inputs ----------------------------------------------------------------------------

STREAMS = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 0xFFFE]), st.integers(0, 0xFFFF))
KINDS = st.one_of(
    st.sampled_from([FZ_PLAYER, FZ_MATCH, FZ_EVENTS, GOOD_KIND, 1, 0]), st.integers(0, 0xFFFF)
)
EIDS = st.one_of(st.integers(0, 7).map(id_from_int), st.binary(min_size=32, max_size=32))
FZ_NAMES = st.from_regex(r"fz_[a-z]{1,5}", fullmatch=True)


def connect_frame(mode: ConnectMode, source: int, stream: int = 1) -> bytes:
    return encode_message(Connect(mode, source, 30_000, 10_000, "fuzz", FUZZ_TOKEN), stream)


CONNECTS = st.one_of(
    st.integers(1, 4).map(lambda s: connect_frame(ConnectMode.TAKEOVER, s)),
    st.just(connect_frame(ConnectMode.READ_ONLY, 0)),
    st.just(connect_frame(ConnectMode.ALLOCATE, 0)),
)


def valid_rows() -> SearchStrategy[bytes]:
    players = st.builds(
        Player,
        name=st.text(max_size=8),
        hp=st.integers(0, 0xFFFF),
        pos=st.builds(Vec2, st.floats(width=32), st.floats(width=32)),
        alive=st.booleans(),
        items=st.lists(st.integers(0, 2**32 - 1), max_size=16),
    )
    matches = st.builds(Match, map_name=st.text(max_size=4), players=st.integers(0, 255))
    return st.one_of(players.map(PLAYER.encode), matches.map(MATCH.encode))


ROWS = st.one_of(valid_rows(), st.binary(max_size=80))
META = st.one_of(st.just(b""), st.binary(max_size=40))


def writes() -> SearchStrategy[Message]:
    return st.one_of(
        st.builds(Assert, KINDS, EIDS, ROWS, META),
        st.builds(Patch, KINDS, EIDS, st.integers(0, 2**64 - 1), st.binary(max_size=40), META),
        st.builds(Retract, KINDS, EIDS, META),
    )


def messages() -> SearchStrategy[Message]:
    definitions = kind_definitions(
        max_fields=4, max_length=32, max_count=4, max_subfields=3, name=FZ_NAMES
    )
    return st.one_of(
        writes(),
        st.lists(writes(), max_size=5).map(lambda ops: Batch(tuple(ops))),  # type: ignore[arg-type]
        st.builds(Query, KINDS, EIDS),
        st.builds(
            Subscribe, KINDS, st.integers(0, 7).map(SubscribeFlags), st.integers(0, 2**64 - 1)
        ),
        st.builds(Unsubscribe, STREAMS),
        st.builds(SubscribeEvents, KINDS, st.integers(0, 100)),
        st.builds(CreateKind, definitions),
        st.builds(
            GetKind,
            st.sampled_from([d.name for d in KIND_DEFS] + ["nope"]),
            st.one_of(st.none(), st.sampled_from(KIND_DEFS)),
        ),
        st.sampled_from([Sync(), EpochBegin(), EpochEnd(), ListKinds(), Heartbeat()]),
    )


@st.composite
def templates(draw: DrawFn) -> bytearray:
    """One valid frame (valid framing; the payload may or may not fit its kind)."""
    if draw(st.integers(0, 9)) == 0:
        opcode = draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0x0E, 0x13, 0x81])))
        return bytearray(encode_frame(opcode, draw(STREAMS), draw(st.binary(max_size=64))))
    message = draw(messages())
    return bytearray(encode_message(message, draw(STREAMS)))


def _fix_crc(frame: bytearray) -> None:
    struct.pack_into("<H", frame, 10, binascii.crc_hqx(bytes(frame[:10]), 0))


def _set_header(fmt: str, offset: int, value: int, fix: bool) -> Callable[[bytearray], None]:
    def mutate(frame: bytearray) -> None:
        struct.pack_into(fmt, frame, offset, value)
        if fix:
            _fix_crc(frame)

    return mutate


@st.composite
def frame_mutation(draw: DrawFn, size: int) -> Callable[[bytearray], None]:
    """One mutation of one frame of `size` bytes: header fields (with the CRC fixed, mostly),
    the CRC itself, a bit, a byte, the kind id, the payload's length or end."""
    fix = draw(st.integers(0, 9)) > 1
    choice = draw(
        st.sampled_from(
            [
                "flip",
                "byte",
                "length",
                "crc",
                "opcode",
                "version",
                "stream",
                "flags",
                "kind",
                "cut",
                "extend",
            ]
        )
    )
    if choice == "flip":
        bit = draw(st.integers(0, size * 8 - 1))
        return lambda f: f.__setitem__(bit // 8, f[bit // 8] ^ (1 << bit % 8))
    if choice == "byte":
        at, value = draw(st.integers(0, size - 1)), draw(st.integers(0, 255))
        return lambda f: f.__setitem__(at, value)
    if choice == "length":
        length = draw(st.one_of(st.integers(0, 2 * size + 16), st.integers(0, 2**32 - 1)))
        return _set_header("<I", 6, length, fix)
    if choice == "crc":
        delta = draw(st.integers(1, 0xFFFF))
        return lambda f: struct.pack_into("<H", f, 10, struct.unpack_from("<H", f, 10)[0] ^ delta)
    if choice == "opcode":
        opcode = draw(st.one_of(st.integers(0, 0xFFFF), st.sampled_from(list(Opcode))))
        return _set_header("<H", 4, opcode, fix)
    if choice == "version":
        return _set_header("<B", 0, draw(st.integers(0, 255)), fix)
    if choice == "stream":
        return _set_header("<H", 2, draw(STREAMS), fix)
    if choice == "flags":
        return _set_header("<B", 1, draw(st.integers(0, 255)), fix)
    if choice == "kind":
        kind = draw(st.integers(0, 0xFFFF))
        return lambda f: struct.pack_into("<H", f, HEADER_SIZE, kind) if len(f) > 13 else None
    if choice == "cut":
        keep = draw(st.integers(HEADER_SIZE, max(size - 1, HEADER_SIZE)))
        return lambda f: _cut(f, keep, fix)
    extra = draw(st.binary(min_size=1, max_size=16))
    return lambda f: _extend(f, extra, fix)


def _cut(frame: bytearray, keep: int, fix: bool) -> None:
    del frame[keep:]
    if fix:  # the header agrees: a short payload; else the header lies and eats what follows
        struct.pack_into("<I", frame, 6, len(frame) - HEADER_SIZE)
        _fix_crc(frame)


def _extend(frame: bytearray, extra: bytes, fix: bool) -> None:
    frame += extra
    if fix:
        struct.pack_into("<I", frame, 6, len(frame) - HEADER_SIZE)
        _fix_crc(frame)


@st.composite
def raw_mutation(draw: DrawFn, data: bytearray) -> None:
    """A mutation of the whole byte stream: truncation, insertion, deletion, a bit flip."""
    if not data:
        return
    at = draw(st.integers(0, len(data) - 1))
    choice = draw(st.sampled_from(["truncate", "insert", "delete", "flip"]))
    if choice == "truncate":
        del data[at:]
    elif choice == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=24))
    elif choice == "delete":
        del data[at : at + draw(st.integers(1, 24))]
    else:
        data[at] ^= 1 << draw(st.integers(0, 7))


@st.composite
def mutated_inputs(draw: DrawFn) -> bytes:
    """Valid frames (most inputs start with a good CONNECT), mutated a few times."""
    frames = draw(st.lists(templates(), min_size=1, max_size=6))
    if draw(st.integers(0, 9)) < 8:
        frames.insert(0, bytearray(draw(CONNECTS)))
    for _ in range(draw(st.integers(0, 3))):
        target = frames[draw(st.integers(0, len(frames) - 1))]
        draw(frame_mutation(len(target)))(target)
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 2))):
        draw(raw_mutation(data))
    return bytes(data)


@st.composite
def random_inputs(draw: DrawFn) -> bytes:
    """Random bytes, alone or after a good CONNECT."""
    data = draw(st.binary(max_size=600))
    return draw(st.sampled_from([b"", connect_frame(ConnectMode.TAKEOVER, 2)])) + data


# --- the server, the well-behaved client, one exchange -------------------------------------


@dataclass
class FuzzTarget:
    server: ServerProcess
    good: WireClient
    versions: dict[int, int] = field(default_factory=dict)
    rows: dict[int, bytes] = field(default_factory=dict)
    inputs: int = 0
    writes: int = 0

    async def good_write(self) -> None:
        """The well-behaved client changes one of its entities and waits for the flush."""
        key = self.writes % GOOD_ENTITIES
        self.writes += 1
        row = PLAYER.encode(Player(name=f"good{key}", hp=self.writes % 65536))
        self.good.send(Assert(GOOD_KIND, id_from_str(f"good-{key}"), row))
        self.versions[key] = self.versions.get(key, 0) + 1
        self.rows[key] = row
        await self.good.sync()

    async def verify_good(self) -> None:
        """Its entities are exactly as it wrote them; it was told nothing it did not ask."""
        for key, row in self.rows.items():
            result = await self.good.request(Query(GOOD_KIND, id_from_str(f"good-{key}")))
            assert isinstance(result, QueryResult), result
            assert (result.status, result.version, result.source_set, result.data) == (
                QueryStatus.ALIVE,
                self.versions[key],
                1 << GOOD_SOURCE,
                row,
            )
        assert self.good.unsolicited.empty(), self.good.unsolicited.get_nowait()
        assert not self.good.eof.is_set()


@pytest.fixture
async def target(tmp_path: Path) -> AsyncIterator[FuzzTarget]:
    args = (
        "--max-payload",
        str(MAX_PAYLOAD),
        "--window-ms",
        "2",
        "--no-fsync",
        "--token",
        f"admin:{GOOD_TOKEN}",
        "--token",
        f"writer:{FUZZ_TOKEN}:1,2,3,4",
        "--max-subscriptions",
        "64",
        "--event-ring",
        "1024",
    )
    async with running_server(tmp_path, *args) as server:
        good = await WireClient.open(server.host, server.port)
        await good.connect(ConnectMode.CLAIM, source_id=GOOD_SOURCE, auth_token=GOOD_TOKEN)
        for expected_id, definition in enumerate(KIND_DEFS, start=FZ_PLAYER):
            info = await good.request(CreateKind(definition))
            assert isinstance(info, KindInfo) and info.kind_id == expected_id, info
        fuzz = FuzzTarget(server, good)
        for _ in range(GOOD_ENTITIES):
            await fuzz.good_write()
        yield fuzz
        await fuzz.verify_good()
        print(
            f"\nfuzz: {fuzz.inputs} inputs tried against the live server ({dict(TRIED)} in "
            f"this session); the well-behaved client wrote {fuzz.writes} times"
        )
        log = server.stderr_path.read_text(errors="replace")
        assert "Traceback" not in log and "Fatal error" not in log, log[-4000:]


async def exchange(server: ServerProcess, data: bytes) -> Exchange:
    """Send one input (and the barrier) on a fresh connection; collect the answers until
    every reply the model requires has come, or the server closed the connection."""
    reader, writer = await asyncio.open_connection(server.host, server.port)
    result = Exchange()
    task = asyncio.create_task(read_replies(reader, result))
    barrier = encode_message(Heartbeat(), BARRIER)
    try:
        writer.write(data + barrier)
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        async with asyncio.timeout(REPLY_TIMEOUT):
            while not answered(data + barrier, result):
                result.changed.clear()
                await result.changed.wait()
        if result.error is not None:
            raise ModelViolation(f"the server sent an unreadable frame: {result.error!r}")
    except TimeoutError:
        raise ModelViolation(f"no complete answer within {REPLY_TIMEOUT} s (a hang?)") from None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.transport.abort()
    return result


async def run_input(target: FuzzTarget, name: str, data: bytes) -> None:
    data = complete(data)
    result = await exchange(target.server, data)
    check(data + encode_message(Heartbeat(), BARRIER), result)
    target.server.check_alive()
    target.inputs += 1
    TRIED[name] += 1
    if target.inputs % 10 == 0:
        await target.good_write()


FUZZ_SETTINGS = settings(
    settings.default,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@settings(FUZZ_SETTINGS, max_examples=MUTATED_EXAMPLES)
@given(data=mutated_inputs())
async def test_mutated_frames_get_protocol_answers(target: FuzzTarget, data: bytes) -> None:
    await run_input(target, "mutated frames", data)


@settings(FUZZ_SETTINGS, max_examples=RANDOM_EXAMPLES)
@given(data=random_inputs())
async def test_random_bytes_get_protocol_answers(target: FuzzTarget, data: bytes) -> None:
    await run_input(target, "random bytes", data)


# --- atheris on the frame reader and the row validator -------------------------------------


def test_atheris_frame_reader_and_row_validator(tmp_path: Path) -> None:
    """Coverage-guided fuzzing (libFuzzer, through atheris) of `FrameReader.feed` and of
    `RowCodec.is_valid` / `validate` (tests/atheris_fuzz.py states the properties checked)."""
    pytest.importorskip("atheris")
    harness = Path(__file__).parent / "atheris_fuzz.py"
    for target_name in ("frames", "rows"):
        result = subprocess.run(
            [
                sys.executable,
                str(harness),
                target_name,
                f"-runs={ATHERIS_RUNS}",
                f"-artifact_prefix={tmp_path}/",
                "-seed=1",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        done = [line for line in result.stderr.splitlines() if line.startswith("Done ")]
        assert done, result.stderr[-2000:]
        print(f"\natheris {target_name}: {done[-1]}")


# --- what the fuzzers found, pinned --------------------------------------------------------


async def test_frames_before_a_bad_header_in_the_same_chunk_are_answered(
    server: ServerProcess,
) -> None:
    """A CONNECT and a QUERY followed, in the same TCP write, by a header with a bad version:
    both are answered before UNSUPPORTED_VERSION (they used to be dropped with the chunk)."""
    client = await WireClient.open(server.host, server.port)
    bad_header = bytes(HEADER_SIZE)  # version 0, and the CRC of ten zero bytes is 0
    client.send_raw(
        encode_message(Connect(ConnectMode.READ_ONLY), 1)
        + encode_message(Query(1, id_from_int(0)), 2)
        + bad_header
    )
    _, connected = await client.reply(1)
    assert isinstance(connected, Connected), connected
    _, result = await client.reply(2)
    assert isinstance(result, QueryResult) and result.status is QueryStatus.NOT_FOUND, result
    await client.expect_async_error(ErrorCode.UNSUPPORTED_VERSION, 0)
    await client.wait_closed()


async def test_get_kind_with_another_kinds_definition_is_schema_conflict(
    server: ServerProcess,
) -> None:
    """It used to raise inside the server, which dropped the connection without a word."""
    client = await WireClient.open(server.host, server.port)
    await client.connect(ConnectMode.ALLOCATE)
    info = await client.request(CreateKind(PLAYER.definition))
    assert isinstance(info, KindInfo)
    reply = await client.request(GetKind("player", MATCH.definition))
    assert isinstance(reply, Error) and reply.code == ErrorCode.SCHEMA_CONFLICT, reply
    assert reply.op == Opcode.GET_KIND and "match" in reply.message
    assert isinstance(await client.request(GetKind("player", PLAYER.definition)), KindInfo)
    assert "Traceback" not in server.stderr_path.read_text()
