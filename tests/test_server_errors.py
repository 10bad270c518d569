"""Every error code a client can provoke, each checked on the wire; bad input never hurts a
well-behaved client on another connection (PROTOCOL.md, "Error codes")."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from convergedb import id_from_int
from convergedb.limits import HEADER_SIZE
from convergedb.protocol import (
    Assert,
    Batch,
    Connect,
    ConnectMode,
    CreateKind,
    Error,
    ErrorCode,
    GetKind,
    Heartbeat,
    KindInfo,
    Opcode,
    Patch,
    Pong,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
    Sync,
    encode_frame,
)
from convergedb.protocol.frame import encode_header
from convergedb.schema.types import Field, FieldType, KindDef
from kinds import PLAYER, Player
from server_fixture import ServerProcess, running_server
from wire_client import WireClient, open_client

ROW = PLAYER.encode(Player(name="ok", hp=1))


async def writer_with_kind(server: ServerProcess, source_id: int) -> tuple[WireClient, int]:
    client = await open_client(server)
    await client.connect(ConnectMode.CLAIM, source_id=source_id)
    info = await client.request(CreateKind(PLAYER.definition))
    assert isinstance(info, KindInfo)
    return client, info.kind_id


async def assert_error_reply(
    client: WireClient, message: object, code: ErrorCode, *, closes: bool, stream: int = 9
) -> Error:
    client.send(message, stream)  # type: ignore[arg-type]
    frame, reply = await client.reply(stream)
    assert isinstance(reply, Error), reply
    assert reply.code == code, reply
    assert bool(frame.flags & 1) == closes
    if closes:
        await client.wait_closed()
    return reply


# --- header errors close the connection ------------------------------------------------------


async def test_bad_crc_is_bad_frame_and_closes(server: ServerProcess) -> None:
    client = await open_client(server)
    header = bytearray(encode_header(Opcode.HEARTBEAT, 0, 0))
    header[-1] ^= 0xFF
    client.send_raw(bytes(header))
    error = await client.expect_async_error(ErrorCode.BAD_FRAME)
    assert "CRC" in error.message or "crc" in error.message
    await client.wait_closed()


async def test_wrong_version_is_unsupported_and_closes(server: ServerProcess) -> None:
    client = await open_client(server)
    body = struct.pack("<BBHHI", 2, 0, 0, Opcode.HEARTBEAT, 0)
    client.send_raw(body + encode_header(0, 0, 0)[:0] + _crc(body))
    await client.expect_async_error(ErrorCode.UNSUPPORTED_VERSION)
    await client.wait_closed()


async def test_oversize_payload_is_rejected_before_it_arrives(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--max-payload", "4096") as server:
        client = await open_client(server)
        await client.connect()
        client.send_raw(encode_header(Opcode.ASSERT, 0, 4097))  # and no payload at all
        await client.expect_async_error(ErrorCode.PAYLOAD_TOO_LARGE)
        await client.wait_closed()


def _crc(body: bytes) -> bytes:
    from binascii import crc_hqx

    return crc_hqx(body, 0).to_bytes(2, "little")


# --- connecting ----------------------------------------------------------------------------------


async def test_anything_before_connect_is_not_connected_and_closes(server: ServerProcess) -> None:
    client = await open_client(server)
    await assert_error_reply(client, Query(1, id_from_int(1)), ErrorCode.NOT_CONNECTED, closes=True)


async def test_heartbeat_is_allowed_before_connect(server: ServerProcess) -> None:
    client = await open_client(server)
    assert isinstance(await client.request(Heartbeat()), Pong)
    await client.connect()
    await client.close()


async def test_second_connect_is_already_connected_and_changes_nothing(
    server: ServerProcess,
) -> None:
    client = await open_client(server)
    first = await client.connect(ConnectMode.CLAIM, source_id=4)
    await assert_error_reply(
        client, Connect(ConnectMode.CLAIM, source_id=5), ErrorCode.ALREADY_CONNECTED, closes=False
    )
    assert first.source_id == 4
    await client.sync()  # still connected


async def test_undefined_connect_mode_is_malformed_and_closes(server: ServerProcess) -> None:
    client = await open_client(server)
    payload = bytearray(Connect(ConnectMode.ALLOCATE).encode())
    payload[0] = 9
    client.send_raw(encode_frame(Opcode.CONNECT, 3, bytes(payload)))
    frame, reply = await client.reply(3)
    assert isinstance(reply, Error) and reply.code == ErrorCode.MALFORMED and frame.flags & 1
    await client.wait_closed()


async def test_claiming_a_held_source_is_source_conflict(server: ServerProcess) -> None:
    holder = await open_client(server)
    await holder.connect(ConnectMode.CLAIM, source_id=7)
    rival = await open_client(server)
    await assert_error_reply(
        rival, Connect(ConnectMode.CLAIM, source_id=7), ErrorCode.SOURCE_CONFLICT, closes=True
    )
    await holder.sync()  # the holder is untouched


async def test_source_id_above_63_is_limit_exceeded(server: ServerProcess) -> None:
    client = await open_client(server)
    await assert_error_reply(
        client, Connect(ConnectMode.CLAIM, source_id=64), ErrorCode.LIMIT_EXCEEDED, closes=True
    )


async def test_takeover_tells_the_old_holder_and_keeps_the_source(server: ServerProcess) -> None:
    old, kind = await writer_with_kind(server, 8)
    old.send(Assert(kind, id_from_int(1), ROW))
    await old.sync()
    new = await open_client(server)
    connected = await new.connect(ConnectMode.TAKEOVER, source_id=8)
    assert connected.source_id == 8
    error = await old.expect_async_error(ErrorCode.TAKEN_OVER, 0)
    assert "taken over" in error.message
    await old.wait_closed()
    result = await new.request(Query(kind, id_from_int(1)))
    assert isinstance(result, QueryResult) and result.source_set == 1 << 8
    new.send(Retract(kind, id_from_int(1)))
    await new.sync()
    gone = await new.request(Query(kind, id_from_int(1)))
    assert isinstance(gone, QueryResult) and gone.status is QueryStatus.TOMBSTONE


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    async with running_server(
        tmp_path,
        "--token", "admin:root",
        "--token", "writer:w12:1,2",
        "--token", "reader:look",
    ) as server:  # fmt: skip
        yield server


async def test_a_bad_or_missing_token_is_auth_failed(secured: ServerProcess) -> None:
    for token in ("", "nope"):
        client = await open_client(secured)
        await assert_error_reply(
            client, Connect(ConnectMode.ALLOCATE, auth_token=token), ErrorCode.AUTH_FAILED,
            closes=True,
        )  # fmt: skip


async def test_tokens_limit_modes_and_sources(secured: ServerProcess) -> None:
    reader = await open_client(secured)
    await assert_error_reply(
        reader, Connect(ConnectMode.ALLOCATE, auth_token="look"), ErrorCode.FORBIDDEN, closes=True
    )
    reader = await open_client(secured)
    assert (await reader.connect(ConnectMode.READ_ONLY, auth_token="look")).source_id == 0xFF

    writer = await open_client(secured)
    await assert_error_reply(
        writer, Connect(ConnectMode.CLAIM, source_id=3, auth_token="w12"), ErrorCode.FORBIDDEN,
        closes=True,
    )  # fmt: skip
    first = await open_client(secured)
    assert (await first.connect(ConnectMode.ALLOCATE, auth_token="w12")).source_id == 1
    second = await open_client(secured)
    assert (await second.connect(ConnectMode.ALLOCATE, auth_token="w12")).source_id == 2
    third = await open_client(secured)
    await assert_error_reply(
        third, Connect(ConnectMode.ALLOCATE, auth_token="w12"), ErrorCode.NO_FREE_SOURCE,
        closes=True,
    )  # fmt: skip
    admin = await open_client(secured)
    assert (await admin.connect(ConnectMode.CLAIM, source_id=3, auth_token="root")).source_id == 3


# --- requests and writes ---------------------------------------------------------------


async def test_writes_from_a_read_only_connection_are_rejected_alone(server: ServerProcess) -> None:
    _owner, kind = await writer_with_kind(server, 1)
    reader = await open_client(server)
    await reader.connect(ConnectMode.READ_ONLY)
    reader.send(Assert(kind, id_from_int(1), ROW))
    await reader.expect_async_error(ErrorCode.READ_ONLY, Opcode.ASSERT)
    await assert_error_reply(
        reader, CreateKind(PLAYER.definition), ErrorCode.READ_ONLY, closes=False
    )
    result = await reader.request(Query(kind, id_from_int(1)))
    assert isinstance(result, QueryResult) and result.status is QueryStatus.NOT_FOUND


async def test_unknown_kind(server: ServerProcess) -> None:
    client, _ = await writer_with_kind(server, 1)
    client.send(Assert(999, id_from_int(1), ROW))
    await client.expect_async_error(ErrorCode.UNKNOWN_KIND, Opcode.ASSERT)
    await assert_error_reply(
        client, Query(999, id_from_int(1)), ErrorCode.UNKNOWN_KIND, closes=False
    )
    await assert_error_reply(client, GetKind("nothing", None), ErrorCode.UNKNOWN_KIND, closes=False)


async def test_schema_conflict_reserved_name_and_invalid_schema(server: ServerProcess) -> None:
    client, _ = await writer_with_kind(server, 1)
    fields = list(PLAYER.definition.fields)
    fields[1] = Field(1, "hp", FieldType.U32)
    changed = KindDef("player", tuple(fields))
    error = await assert_error_reply(
        client, CreateKind(changed), ErrorCode.SCHEMA_CONFLICT, closes=False
    )
    assert "hp" in error.message and "u16" in error.message
    removed = KindDef("player", PLAYER.definition.fields[:2])
    error = await assert_error_reply(
        client, CreateKind(removed), ErrorCode.SCHEMA_CONFLICT, closes=False
    )
    assert "cannot be removed" in error.message
    reserved = KindDef("convergedb_mine", (Field(0, "a", FieldType.U8),))
    await assert_error_reply(client, CreateKind(reserved), ErrorCode.RESERVED_NAME, closes=False)
    bad = bytearray(CreateKind(KindDef("k", (Field(0, "a", FieldType.U8),))).encode())
    bad[-5] = 99  # the field's type code
    client.send_raw(encode_frame(Opcode.CREATE_KIND, 9, bytes(bad)))
    _frame, reply = await client.reply(9)
    assert isinstance(reply, Error) and reply.code == ErrorCode.INVALID_SCHEMA, reply


async def test_invalid_data_is_rejected_alone(server: ServerProcess) -> None:
    client, kind = await writer_with_kind(server, 1)
    client.send(Assert(kind, id_from_int(1), ROW[:-1]))
    error = await client.expect_async_error(ErrorCode.INVALID_DATA, Opcode.ASSERT)
    assert "row is" in error.message
    client.send(Patch(kind, id_from_int(1), 1 << 40, b""))
    await client.expect_async_error(ErrorCode.INVALID_DATA, Opcode.PATCH)
    client.send(Assert(kind, id_from_int(2), ROW))
    await client.sync()
    good = await client.request(Query(kind, id_from_int(2)))
    assert isinstance(good, QueryResult) and good.status is QueryStatus.ALIVE
    bad = await client.request(Query(kind, id_from_int(1)))
    assert isinstance(bad, QueryResult) and bad.status is QueryStatus.NOT_FOUND


async def test_malformed_payloads_and_requests_on_stream_zero(server: ServerProcess) -> None:
    client, kind = await writer_with_kind(server, 1)
    client.send_raw(encode_frame(Opcode.ASSERT, 0, Assert(kind, id_from_int(1), ROW).encode()[:20]))
    await client.expect_async_error(ErrorCode.MALFORMED, Opcode.ASSERT)
    client.send(Sync(), 0)
    await client.expect_async_error(ErrorCode.MALFORMED, Opcode.SYNC)
    await client.sync()  # still connected


async def test_unknown_opcode_is_skipped(server: ServerProcess) -> None:
    client = await open_client(server)
    await client.connect()
    client.send_raw(encode_frame(0x7F, 5, b"whatever"))
    frame, reply = await client.reply(5)
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_OPCODE
    assert not frame.flags & 1
    await client.sync()


async def test_a_bad_batch_sub_operation_is_rejected_alone(server: ServerProcess) -> None:
    client, kind = await writer_with_kind(server, 1)
    good = Assert(kind, id_from_int(1), ROW).encode()
    bad = Assert(kind, id_from_int(2), ROW[:-2]).encode()
    later = Assert(kind, id_from_int(3), ROW).encode()
    payload = struct.pack("<I", 4)
    for op, body in ((2, good), (2, bad), (0x7E, b"zz"), (2, later)):
        payload += struct.pack("<BI", op, len(body)) + body
    client.send_raw(encode_frame(Opcode.BATCH, 0, payload))
    await client.expect_async_error(ErrorCode.INVALID_DATA, Opcode.ASSERT)
    await client.expect_async_error(ErrorCode.MALFORMED, 0x7E)
    await client.sync()
    for eid, status in ((1, QueryStatus.ALIVE), (2, QueryStatus.NOT_FOUND), (3, QueryStatus.ALIVE)):
        result = await client.request(Query(kind, id_from_int(eid)))
        assert isinstance(result, QueryResult) and result.status is status


async def test_batch_asserts_of_an_unknown_kind_are_rejected_one_by_one(
    server: ServerProcess,
) -> None:
    """The BATCH fast path checks each kind id change: two ASSERTs of an unknown kind between
    good ones, an ASSERT with meta after them (the general path) -- each decided alone."""
    client, kind = await writer_with_kind(server, 1)
    ops = [
        Assert(kind, id_from_int(1), ROW),
        Assert(999, id_from_int(2), ROW),
        Assert(999, id_from_int(3), ROW),
        Assert(kind, id_from_int(4), ROW),
        Assert(kind, id_from_int(5), ROW, b"meta"),
    ]
    payload = struct.pack("<I", len(ops))
    for op in ops:
        body = op.encode()
        payload += struct.pack("<BI", Opcode.ASSERT, len(body)) + body
    client.send_raw(encode_frame(Opcode.BATCH, 0, payload))
    await client.expect_async_error(ErrorCode.UNKNOWN_KIND, Opcode.ASSERT)
    await client.expect_async_error(ErrorCode.UNKNOWN_KIND, Opcode.ASSERT)
    await client.sync()
    for eid in (1, 4, 5):
        result = await client.request(Query(kind, id_from_int(eid)))
        assert isinstance(result, QueryResult) and result.status is QueryStatus.ALIVE


async def test_a_batch_that_overruns_keeps_the_operations_before_it(server: ServerProcess) -> None:
    client, kind = await writer_with_kind(server, 1)
    body = Assert(kind, id_from_int(1), ROW).encode()
    payload = struct.pack("<I", 3) + struct.pack("<BI", 2, len(body)) + body
    payload += struct.pack("<BI", 2, 10_000) + b"short"
    client.send_raw(encode_frame(Opcode.BATCH, 0, payload))
    await client.expect_async_error(ErrorCode.MALFORMED, Opcode.BATCH)
    await client.sync()
    result = await client.request(Query(kind, id_from_int(1)))
    assert isinstance(result, QueryResult) and result.status is QueryStatus.ALIVE


async def test_shutting_down_is_sent_on_sigterm(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        client = await open_client(server)
        await client.connect()
        await server.stop()
        await client.expect_async_error(ErrorCode.SHUTTING_DOWN, 0)
        await client.wait_closed()


# --- a well-behaved client is unaffected by all of the above ------------------------------


async def test_abuse_on_other_connections_does_not_touch_a_good_client(
    server: ServerProcess,
) -> None:
    good, kind = await writer_with_kind(server, 30)
    good.send(Batch(tuple(Assert(kind, id_from_int(i), ROW) for i in range(100))))
    await good.sync()
    abusers = []
    for raw in (
        b"\x00" * HEADER_SIZE,
        encode_header(Opcode.ASSERT, 0, 1 << 30),
        encode_frame(Opcode.QUERY, 1, b""),
        encode_frame(Opcode.CONNECT, 1, b"\x09"),
        encode_frame(0x55, 0, b"x" * 100),
    ):
        abuser = await open_client(server)
        abuser.send_raw(raw)
        abusers.append(abuser)
    connected = await open_client(server)
    await connected.connect(ConnectMode.CLAIM, source_id=31)
    connected.send(Assert(kind, id_from_int(5), ROW[:3]))
    connected.send(Retract(kind, id_from_int(6)))
    connected.send_raw(encode_frame(Opcode.BATCH, 0, b"\xff\xff\xff\xff"))
    await connected.sync()
    for abuser in abusers[:4]:
        await abuser.wait_closed()
    good.send(Assert(kind, id_from_int(100), ROW))
    await good.sync()
    for i in range(101):
        result = await good.request(Query(kind, id_from_int(i)))
        assert isinstance(result, QueryResult)
        assert (result.status, result.version, result.source_set) == (
            QueryStatus.ALIVE, 1, 1 << 30
        )  # fmt: skip
        assert result.data == ROW
    assert isinstance(await good.request(Heartbeat()), Pong)
    assert isinstance(await connected.request(Heartbeat()), Pong)
