"""Messages: encode/decode round trips, malformed payloads, BATCH iteration, and the test vectors
of docs/protocol.md (docs/protocol.md, "Client → server", "Server → client")."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from convergedb.limits import MAX_METADATA_LENGTH
from convergedb.protocol import (
    CLIENT_MESSAGES,
    SERVER_MESSAGES,
    Assert,
    Batch,
    BootstrapBegin,
    BootstrapEnd,
    BootstrapMode,
    ChangeType,
    Connect,
    Connected,
    ConnectMode,
    CreateKind,
    DeleteCause,
    Deleted,
    EncodeError,
    EpochBegin,
    EpochEnd,
    Error,
    ErrorCode,
    Event,
    EventCause,
    FrameReader,
    GetKind,
    Heartbeat,
    KindInfo,
    KindList,
    ListKinds,
    Message,
    Ok,
    Opcode,
    Patch,
    Pong,
    ProtocolError,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
    State,
    Subscribe,
    SubscribeEvents,
    SubscribeFlags,
    Sync,
    Unsubscribe,
    decode_message,
    encode_message,
    error_code_for,
    iter_batch,
)
from convergedb.protocol.wire import Reader, pack_meta, pack_str16
from convergedb.schema.errors import InvalidData, InvalidSchema, ReservedName, SchemaConflict
from convergedb.schema.types import Field, FieldType, KindDef

DOCS = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

# --- strategies -------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)
eids = st.binary(min_size=32, max_size=32)
blobs = st.binary(max_size=40)
metas = st.binary(max_size=20)
texts = st.text(max_size=12)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


@st.composite
def fields(draw: st.DrawFn, ordinal: int, name: str) -> Field:
    """A valid field: a scalar, a string/bytes, or a struct, possibly an array."""
    shape = draw(st.sampled_from(["scalar", "text", "struct"]))
    array = draw(st.booleans())
    max_count = draw(st.integers(1, 1024)) if array else 0
    if shape == "scalar":
        scalar = draw(st.sampled_from([t for t in FieldType if t.is_scalar]))
        return Field(ordinal, name, scalar, array=array, max_count=max_count)
    if shape == "text":
        text = draw(st.sampled_from([FieldType.STRING, FieldType.BYTES]))
        fixed = array or draw(st.booleans())
        max_length = draw(st.integers(1, 65_535))
        return Field(ordinal, name, text, fixed, array, max_length, max_count)
    member = Field(0, draw(names), FieldType.U32)
    return Field(
        ordinal, name, FieldType.STRUCT, False, array, 0, max_count, draw(names), (member,)
    )


@st.composite
def kind_definitions(draw: st.DrawFn) -> KindDef:
    """A small valid kind definition."""
    field_names = draw(st.lists(names, min_size=1, max_size=3, unique=True))
    kind_fields = tuple(draw(fields(i, name)) for i, name in enumerate(field_names))
    return KindDef(draw(names), kind_fields, draw(st.booleans()), draw(st.booleans()))


kinds = kind_definitions()
event_ops = st.sampled_from([Opcode.ASSERT, Opcode.RETRACT, Opcode.PATCH])
subscribe_flags = st.integers(0, 7).map(SubscribeFlags)
kind_infos = st.builds(KindInfo, u16, u16, kinds)

asserts = st.builds(Assert, u16, eids, blobs, metas)
retracts = st.builds(Retract, u16, eids, metas)
patches = st.builds(Patch, u16, eids, u64, blobs, metas)

STRATEGIES: dict[type[Message], SearchStrategy[Message]] = {
    Connect: st.builds(Connect, st.sampled_from(ConnectMode), u8, u32, u32, texts, texts),
    Assert: asserts,
    Retract: retracts,
    Query: st.builds(Query, u16, eids),
    Subscribe: st.builds(Subscribe, u16, subscribe_flags, u64),
    Unsubscribe: st.builds(Unsubscribe, u16),
    Heartbeat: st.just(Heartbeat()),
    Patch: patches,
    EpochBegin: st.just(EpochBegin()),
    EpochEnd: st.just(EpochEnd()),
    Batch: st.builds(Batch, st.lists(st.one_of(asserts, retracts, patches), max_size=4).map(tuple)),
    Sync: st.just(Sync()),
    SubscribeEvents: st.builds(SubscribeEvents, u16, u64),
    CreateKind: st.builds(CreateKind, kinds),
    GetKind: st.builds(GetKind, texts, st.none() | kinds),
    ListKinds: st.just(ListKinds()),
    State: st.builds(
        State, u16, eids, st.sampled_from(ChangeType), u64, u64, u64, u64, blobs, blobs, metas
    ),
    Deleted: st.builds(Deleted, u16, eids, u64, u64, st.sampled_from(DeleteCause), blobs, metas),
    BootstrapBegin: st.builds(BootstrapBegin, u16, st.sampled_from(BootstrapMode), u64),
    BootstrapEnd: st.builds(BootstrapEnd, u16, u64),
    Connected: st.builds(Connected, u8, u32, u32, u32, texts),
    QueryResult: st.builds(QueryResult, st.sampled_from(QueryStatus), u64, u64, blobs),
    KindInfo: kind_infos,
    Ok: st.builds(Ok, u64),
    Error: st.builds(Error, st.sampled_from(ErrorCode) | u16, u16, texts),
    Event: st.builds(
        Event, u16, u64, u8, event_ops, st.sampled_from(EventCause), eids, u64, blobs, metas
    ),
    Pong: st.just(Pong()),
    KindList: st.builds(KindList, st.lists(kind_infos, max_size=2).map(tuple)),
}
messages = st.one_of(*STRATEGIES.values())

WITH_META_TAIL = (Assert, Retract, Patch, State, Deleted, Event)
"""Write operations and notifications: the meta tail may be absent."""
WITH_KIND_DEFINITION = (CreateKind, GetKind, KindInfo, KindList)
"""A truncated kind definition is INVALID_SCHEMA rather than MALFORMED."""

E42 = (42).to_bytes(32, "little")
E43 = (43).to_bytes(32, "little")


def decode_error(cls: type[Message], payload: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        cls.decode(payload)
    return info.value


def assert_malformed(cls: type[Message], payload: bytes, op: int | None = None) -> None:
    error = decode_error(cls, payload)
    assert error.code is ErrorCode.MALFORMED
    assert error.op == (cls.OPCODE if op is None else op)


# --- registry ---------------------------------------------------------------------------------


def test_every_opcode_has_exactly_one_message_class() -> None:
    assert set(CLIENT_MESSAGES) | set(SERVER_MESSAGES) == set(Opcode)
    assert all(op < 0x80 for op in CLIENT_MESSAGES)
    assert all(op > 0x80 for op in SERVER_MESSAGES)
    for op, cls in {**CLIENT_MESSAGES, **SERVER_MESSAGES}.items():
        assert op == cls.OPCODE


def test_every_message_class_has_a_strategy() -> None:
    assert set(STRATEGIES) == set(CLIENT_MESSAGES.values()) | set(SERVER_MESSAGES.values())


def test_unknown_opcode() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_message(0x42, b"")
    assert info.value.code is ErrorCode.UNKNOWN_OPCODE
    assert info.value.op == 0x42


# --- round trips ------------------------------------------------------------------------------


@given(messages)
def test_round_trip(msg: Message) -> None:
    payload = msg.encode()
    decoded = decode_message(msg.OPCODE, payload)
    assert decoded == msg
    assert type(decoded) is type(msg)
    assert decode_message(msg.OPCODE, memoryview(payload)) == msg
    assert decode_message(msg.OPCODE, bytearray(payload)) == msg


@given(messages, u16)
def test_round_trip_through_a_frame(msg: Message, stream_id: int) -> None:
    (frame,) = FrameReader().feed(encode_message(msg, stream_id))
    assert (frame.stream_id, frame.opcode) == (stream_id, msg.OPCODE)
    assert decode_message(frame.opcode, frame.payload) == msg


def test_enums_decode_into_their_types() -> None:
    connect = Connect.decode(Connect(ConnectMode.TAKEOVER, 1).encode())
    assert type(connect.mode) is ConnectMode
    state = State.decode(State(1, E42, ChangeType.UPDATED, 2, 3, 4, 5, b"").encode())
    assert type(state.type) is ChangeType
    event = Event.decode(
        Event(1, 2, 3, Opcode.PATCH, EventCause.CLIENT_WRITE, E42, 1, b"").encode()
    )
    assert type(event.op) is Opcode
    assert type(event.cause) is EventCause
    subscribe = Subscribe.decode(Subscribe(1, SubscribeFlags.RESUME).encode())
    assert type(subscribe.flags) is SubscribeFlags


def test_error_with_an_unknown_code_still_decodes() -> None:
    error = Error.decode(Error(999, 0x02, "from a newer server").encode())
    assert error.code == 999
    assert not isinstance(error.code, ErrorCode)
    assert Error.decode(Error(16, 0, "").encode()).code is ErrorCode.MALFORMED


def test_error_from_exception() -> None:
    exc = ProtocolError(ErrorCode.UNKNOWN_KIND, "no kind 9", Opcode.ASSERT)
    assert Error.from_exception(exc) == Error(ErrorCode.UNKNOWN_KIND, Opcode.ASSERT, "no kind 9")


# --- truncation and leftovers -----------------------------------------------------------------


@given(messages)
def test_every_truncation_is_rejected(msg: Message) -> None:
    payload = msg.encode()
    meta_start = None
    if isinstance(msg, WITH_META_TAIL):
        meta_start = len(payload) - 2 - len(msg.meta)
    for cut in range(len(payload)):
        if cut == meta_start:
            continue
        error = decode_error(type(msg), payload[:cut])
        if isinstance(msg, WITH_KIND_DEFINITION):
            assert error.code in (ErrorCode.MALFORMED, ErrorCode.INVALID_SCHEMA)
        else:
            assert error.code is ErrorCode.MALFORMED
        assert error.op == msg.OPCODE


@given(messages, st.binary(min_size=1, max_size=3))
def test_leftover_bytes_are_rejected(msg: Message, extra: bytes) -> None:
    assert_malformed(type(msg), msg.encode() + extra)


@pytest.mark.parametrize(
    "msg",
    [
        Assert(1, E42, b"row", b""),
        Retract(1, E42),
        Patch(1, E42, 0b101, b"vals"),
        State(1, E42, ChangeType.CREATED, 1, 1, 7, 9, b"row"),
        Deleted(1, E42, 2, 9, DeleteCause.LIVENESS, b"prev"),
        Event(1, 5, 3, Opcode.RETRACT, EventCause.EPOCH_END, E42, 0, b""),
    ],
    ids=lambda msg: type(msg).__name__,
)
def test_meta_tail_may_be_absent(msg: Message) -> None:
    payload = msg.encode()
    assert payload.endswith(b"\x00\x00"), "encoders always write the meta length"
    assert type(msg).decode(payload[:-2]) == msg
    assert_malformed(type(msg), payload[:-1])


def test_meta_round_trips_at_its_limit() -> None:
    msg = Assert(1, E42, b"", b"m" * MAX_METADATA_LENGTH)
    assert Assert.decode(msg.encode()) == msg


# --- undefined values and bad text ------------------------------------------------------------


def test_undefined_connect_mode() -> None:
    payload = bytearray(Connect(ConnectMode.CLAIM).encode())
    payload[0] = 4
    assert_malformed(Connect, bytes(payload))


def test_invalid_utf8_is_malformed() -> None:
    payload = Connect(ConnectMode.ALLOCATE).encode()[:10] + b"\x02\x00\xff\xfe" + b"\x00\x00"
    assert_malformed(Connect, payload)


@pytest.mark.parametrize(
    ("msg", "offset", "value"),
    [
        (State(1, E42, ChangeType.CREATED, 1, 1, 1, 1, b""), 34, 0),
        (State(1, E42, ChangeType.CREATED, 1, 1, 1, 1, b""), 34, 4),
        (Deleted(1, E42, 1, 1, DeleteCause.RETRACTED), 50, 3),
        (QueryResult(QueryStatus.ALIVE, 1, 1, b"x"), 0, 3),
        (BootstrapBegin(1, BootstrapMode.FULL, 0), 2, 2),
        (Event(1, 1, 1, Opcode.ASSERT, EventCause.CLIENT_WRITE, E42, 0, b""), 11, 0x04),
        (Event(1, 1, 1, Opcode.ASSERT, EventCause.CLIENT_WRITE, E42, 0, b""), 12, 3),
        (Subscribe(1), 2, 0x08),
        (GetKind("k"), 3, 2),
    ],
)
def test_undefined_enum_values(msg: Message, offset: int, value: int) -> None:
    payload = bytearray(msg.encode())
    payload[offset] = value
    assert_malformed(type(msg), bytes(payload))


def test_invalid_kind_definition_is_invalid_schema() -> None:
    valid = CreateKind(KindDef("k", (Field(0, "x", FieldType.U8),))).encode()
    broken = bytearray(valid)
    broken[7] = 1  # the only field's ordinal: must be 0
    error = decode_error(CreateKind, bytes(broken))
    assert error.code is ErrorCode.INVALID_SCHEMA
    assert error.op == Opcode.CREATE_KIND


# --- encoder limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        Assert(1, b"short", b""),
        Retract(1, E42 + b"x"),
        Query(1, b""),
        Assert(1, E42, b"", b"m" * (MAX_METADATA_LENGTH + 1)),
        Patch(1, E42, 0, b"", b"m" * (MAX_METADATA_LENGTH + 1)),
        Assert(70_000, E42, b""),
        Ok(-1),
        Ok(2**64),
        Connect(ConnectMode.CLAIM, 256),
        Connect(ConnectMode.CLAIM, name="é" * 40_000),
        Error(ErrorCode.INTERNAL, 0, "x" * 65_536),
        Batch((Ok(1),)),  # type: ignore[arg-type]
    ],
    ids=repr,
)
def test_encoder_refuses_values_that_break_a_limit(msg: Message) -> None:
    with pytest.raises(EncodeError):
        msg.encode()


def test_encode_error_is_a_value_error() -> None:
    assert issubclass(EncodeError, ValueError)


def test_invalid_kind_is_refused_on_encode() -> None:
    with pytest.raises(InvalidSchema):
        CreateKind(KindDef("k", ())).encode()


def test_wire_helpers() -> None:
    assert pack_meta(b"") == b"\x00\x00"
    assert pack_str16("hé") == b"\x03\x00h\xc3\xa9"
    reader = Reader(b"\x01\x00\x02\x00ab", Opcode.GET_KIND)
    assert reader.u16() == 1
    assert reader.str16() == "ab"
    assert reader.at_end()
    assert reader.meta() == b""
    with pytest.raises(ProtocolError, match="kind_id"):
        reader.u16("kind_id")


# --- BATCH ------------------------------------------------------------------------------------


def batch_payload(count: int, *ops: tuple[int, bytes], tail: bytes = b"") -> bytes:
    body = b"".join(struct.pack("<BI", op, len(b)) + b for op, b in ops)
    return struct.pack("<I", count) + body + tail


ASSERT_BODY = Assert(1, E42, b"row").encode()
RETRACT_BODY = Retract(1, E43).encode()


def collect(payload: bytes) -> tuple[list[tuple[int, bytes]], ProtocolError | None]:
    """Apply-as-you-go: the sub-operations yielded before the error, and the error."""
    seen: list[tuple[int, bytes]] = []
    try:
        for op, body in iter_batch(payload):
            seen.append((op, bytes(body)))
    except ProtocolError as exc:
        return seen, exc
    return seen, None


def test_iter_batch_yields_every_sub_operation() -> None:
    payload = batch_payload(3, (2, ASSERT_BODY), (3, RETRACT_BODY), (0x55, b"??"))
    seen, error = collect(payload)
    assert error is None
    assert seen == [(2, ASSERT_BODY), (3, RETRACT_BODY), (0x55, b"??")]


def test_iter_batch_empty() -> None:
    assert collect(batch_payload(0)) == ([], None)


@pytest.mark.parametrize(
    ("payload", "applied"),
    [
        # the third body_len overruns the frame: the rest of the batch is rejected
        (batch_payload(3, (2, ASSERT_BODY), (3, RETRACT_BODY), tail=b"\x02\xff\x00\x00\x00ab"), 2),
        # count says 3 but the frame ends after 2
        (batch_payload(3, (2, ASSERT_BODY), (3, RETRACT_BODY)), 2),
        # the frame ends inside the third sub-operation's header
        (batch_payload(3, (2, ASSERT_BODY), (3, RETRACT_BODY), tail=b"\x02\x01"), 2),
        # count says 1 but a second sub-operation follows
        (batch_payload(1, (2, ASSERT_BODY), (3, RETRACT_BODY)), 1),
        # no count at all
        (b"\x01\x00", 0),
    ],
    ids=["overrun", "count-too-high", "cut-header", "count-too-low", "no-count"],
)
def test_iter_batch_bad_parts(payload: bytes, applied: int) -> None:
    seen, error = collect(payload)
    assert len(seen) == applied
    assert error is not None
    assert error.code is ErrorCode.MALFORMED
    assert error.op == Opcode.BATCH


def test_strict_batch_decode_names_the_sub_operation() -> None:
    error = decode_error(Batch, batch_payload(1, (0x55, b"")))
    assert (error.code, error.op) == (ErrorCode.MALFORMED, 0x55)
    error = decode_error(Batch, batch_payload(1, (2, ASSERT_BODY[:-5])))
    assert (error.code, error.op) == (ErrorCode.MALFORMED, Opcode.ASSERT)


# --- error codes ------------------------------------------------------------------------------


def test_error_code_for() -> None:
    assert error_code_for(InvalidSchema("x")) is ErrorCode.INVALID_SCHEMA
    assert error_code_for(ReservedName("x")) is ErrorCode.RESERVED_NAME
    assert error_code_for(SchemaConflict("x")) is ErrorCode.SCHEMA_CONFLICT
    assert error_code_for(InvalidData("x")) is ErrorCode.INVALID_DATA
    assert error_code_for(ProtocolError(ErrorCode.FORBIDDEN, "x")) is ErrorCode.FORBIDDEN
    assert error_code_for(RuntimeError("x")) is ErrorCode.INTERNAL


# --- docs/protocol.md test vectors ------------------------------------------------------------

DOC_VECTORS: dict[str, tuple[Message, int]] = {
    "CONNECT": (Connect(ConnectMode.CLAIM, 3, 30_000, 15_000, "svc", "tok"), 1),
    "ASSERT": (Assert(5, E42, b"\x01\x02\x03", b"hi"), 0),
    "BATCH": (Batch((Assert(5, E42, b"\x07"), Retract(5, E43))), 0),
    "OK": (Ok(123), 9),
    "ERROR": (Error(ErrorCode.MALFORMED, Opcode.ASSERT, "bad"), 0),
    "CREATE_KIND": (CreateKind(KindDef("pos", (Field(0, "x", FieldType.I32),))), 2),
}


def doc_vectors() -> dict[str, bytes]:
    """Each `### NAME` of the "Test vectors" section with the bytes of its hex block."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("\n## Test vectors\n", 1)[1]
    vectors: dict[str, bytes] = {}
    for block in re.split(r"^### ", section, flags=re.MULTILINE)[1:]:
        name = block.split("\n", 1)[0].strip()
        match = re.search(r"```hex\n(.*?)```", block, flags=re.DOTALL)
        assert match, f"vector {name} has no hex block"
        vectors[name] = bytes.fromhex(match.group(1))
    return vectors


def test_docs_start_with_the_shared_contract() -> None:
    shared = Path("/work/shared/PROTOCOL.md")
    if not shared.exists():
        pytest.skip("the shared contract is not on this machine")
    ours = DOCS.read_text(encoding="utf-8")
    assert ours.startswith(shared.read_text(encoding="utf-8"))


def test_docs_have_exactly_the_tested_vectors() -> None:
    assert set(doc_vectors()) == set(DOC_VECTORS)


@pytest.mark.parametrize("name", sorted(DOC_VECTORS))
def test_docs_vector(name: str) -> None:
    msg, stream_id = DOC_VECTORS[name]
    expected = doc_vectors()[name]
    assert encode_message(msg, stream_id) == expected
    (frame,) = FrameReader().feed(expected)
    assert frame.stream_id == stream_id
    assert decode_message(frame.opcode, frame.payload) == msg


@given(
    st.integers(0, 0xFFFF),
    st.sampled_from(list(QueryStatus)),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=300),
)
def test_the_query_result_fast_encoder_matches_the_message(
    stream_id: int, status: QueryStatus, version: int, sources: int, data: bytes
) -> None:
    from convergedb.protocol.messages import encode_query_result

    expected = encode_message(QueryResult(status, version, sources, data), stream_id)
    assert encode_query_result(stream_id, status, version, sources, data) == expected
