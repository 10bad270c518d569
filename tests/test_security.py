"""Security and limits, on the wire: tokens and roles, `--max-connections`,
`--max-subscriptions`, the read timeout (a client that sends a header and then nothing),
`--max-payload`, and the server's resident memory under each kind of abuse.

What tests/test_server_errors.py and tests/test_client_connect.py already show (each error
code once, allocation among a token's sources, the SDK's AuthFailed/Forbidden) is not repeated:
these tests go after the ways around them (takeover, pipelining behind a refused CONNECT,
a reader's every write path) and after the limits that protect the server's memory.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from convergedb import id_from_int, id_from_str
from convergedb.protocol import (
    SERVER_CLOSING_FLAG,
    Assert,
    Batch,
    Connect,
    ConnectMode,
    CreateKind,
    EpochBegin,
    EpochEnd,
    Error,
    ErrorCode,
    Heartbeat,
    KindInfo,
    KindList,
    ListKinds,
    Ok,
    Opcode,
    Patch,
    Pong,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
    Subscribe,
    SubscribeEvents,
    SubscribeFlags,
    Sync,
    Unsubscribe,
    encode_frame,
    encode_message,
)
from convergedb.protocol.frame import encode_header
from convergedb.schema.types import Field, FieldType, KindDef
from kinds import PLAYER, Player
from server_fixture import ServerProcess, running_server
from wire_client import WireClient, open_client

LONG = os.environ.get("CONVERGEDB_TORTURE") == "long"
ROW = PLAYER.encode(Player(name="kept", hp=7))
TOKENS = ("--token", "admin:root", "--token", "writer:w12:1,2", "--token", "reader:look")
EVENTS = KindDef("security_events", (Field(0, "n", FieldType.U32),), event_stream=True)
MiB = 1024 * 1024


async def connected(server: ServerProcess, mode: ConnectMode, **fields: object) -> WireClient:
    client = await open_client(server)
    await client.connect(mode, **fields)  # type: ignore[arg-type]
    return client


async def register(client: WireClient, definition: KindDef) -> int:
    info = await client.request(CreateKind(definition))
    assert isinstance(info, KindInfo), info
    return info.kind_id


async def query(client: WireClient, kind: int, eid: bytes) -> QueryResult:
    result = await client.request(Query(kind, eid))
    assert isinstance(result, QueryResult), result
    return result


async def refused(client: WireClient, connect: Connect, code: ErrorCode) -> None:
    """`connect` is answered with `code`, the closing flag, and the connection ends."""
    client.send(connect, 1)
    frame, reply = await client.reply(1)
    assert isinstance(reply, Error) and reply.code == code, reply
    assert frame.flags & SERVER_CLOSING_FLAG
    await client.wait_closed()


def rss_bytes(server: ServerProcess) -> int:
    """The server process's resident set size, from /proc."""
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` every 20 ms until it holds; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


# --- tokens and roles ----------------------------------------------------------------------


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    async with running_server(tmp_path, *TOKENS) as server:
        yield server


async def admin_with_data(server: ServerProcess, source_id: int) -> tuple[WireClient, int]:
    """An admin writer holding `source_id` with entities 0..9 of the player kind."""
    admin = await connected(server, ConnectMode.CLAIM, source_id=source_id, auth_token="root")
    kind = await register(admin, PLAYER.definition)
    admin.send(Batch(tuple(Assert(kind, id_from_int(i), ROW) for i in range(10))))
    await admin.sync()
    return admin, kind


async def assert_untouched(holder: WireClient, kind: int, source_id: int) -> None:
    """The holder is still connected, was told nothing, and its entities are as written."""
    assert isinstance(await holder.request(Heartbeat()), Pong)
    assert holder.unsolicited.empty(), holder.unsolicited.get_nowait()
    for i in range(10):
        result = await query(holder, kind, id_from_int(i))
        assert (result.status, result.version, result.source_set, result.data) == (
            QueryStatus.ALIVE, 1, 1 << source_id, ROW
        )  # fmt: skip


async def test_a_reader_token_can_read_but_never_write(secured: ServerProcess) -> None:
    admin, kind = await admin_with_data(secured, 5)
    for mode, source in ((ConnectMode.CLAIM, 6), (ConnectMode.TAKEOVER, 5)):
        intruder = await open_client(secured)
        await refused(intruder, Connect(mode, source, auth_token="look"), ErrorCode.FORBIDDEN)
    reader = await connected(secured, ConnectMode.READ_ONLY, auth_token="look")
    eid = id_from_int(0)
    for message, op in (
        (Assert(kind, eid, PLAYER.encode(Player(name="evil"))), Opcode.ASSERT),
        (Patch(kind, eid, 1 << 1, struct.pack("<H", 999)), Opcode.PATCH),
        (Retract(kind, eid), Opcode.RETRACT),
        (Batch((Retract(kind, eid), Assert(kind, id_from_int(99), ROW))), Opcode.RETRACT),
    ):
        reader.send(message)
        await reader.expect_async_error(ErrorCode.READ_ONLY, op)
    for request, op in (
        (CreateKind(PLAYER.definition), Opcode.CREATE_KIND),
        (EpochBegin(), Opcode.SOURCE_EPOCH_BEGIN),
        (EpochEnd(), Opcode.SOURCE_EPOCH_END),
    ):
        reply = await reader.request(request)
        assert isinstance(reply, Error) and (reply.code, reply.op) == (ErrorCode.READ_ONLY, op)
    await reader.expect_async_error(ErrorCode.READ_ONLY, Opcode.ASSERT)  # the batch's second op
    assert isinstance(await reader.request(ListKinds()), KindList)
    assert isinstance(await reader.request(Subscribe(kind)), Ok)
    await assert_untouched(admin, kind, 5)
    assert (await query(reader, kind, id_from_int(99))).status is QueryStatus.NOT_FOUND


async def test_a_writer_limited_to_sources_cannot_claim_or_take_over_another(
    secured: ServerProcess,
) -> None:
    admin, kind = await admin_with_data(secured, 5)
    for mode in (ConnectMode.CLAIM, ConnectMode.TAKEOVER):
        writer = await open_client(secured)
        await refused(writer, Connect(mode, 5, auth_token="w12"), ErrorCode.FORBIDDEN)
    await assert_untouched(admin, kind, 5)
    first = await connected(secured, ConnectMode.CLAIM, source_id=1, auth_token="w12")
    second = await connected(secured, ConnectMode.TAKEOVER, source_id=1, auth_token="w12")
    await first.expect_async_error(ErrorCode.TAKEN_OVER, 0)  # its own source: allowed
    await first.wait_closed()
    second.send(Assert(kind, id_from_int(0), PLAYER.encode(Player(name="shared"))))
    await second.sync()
    shared = await query(admin, kind, id_from_int(0))
    assert shared.source_set == 1 << 5 | 1 << 1  # a second writer, not a replacement of source 5
    admin_takeover = await connected(secured, ConnectMode.TAKEOVER, source_id=1, auth_token="root")
    await second.expect_async_error(ErrorCode.TAKEN_OVER, 0)  # admin may take any source
    assert isinstance(await admin_takeover.request(Heartbeat()), Pong)


BAD_TOKENS = ("", "nope", "roo", "root ", "ROOT", "look\x00", "w12:1", "root" * 100)


async def test_a_bad_token_gets_nothing_even_pipelined(secured: ServerProcess) -> None:
    """A refused CONNECT followed, in the same write, by requests and writes: the only answer
    is AUTH_FAILED, nothing behind it runs, and the holder of the claimed source is left alone."""
    admin, kind = await admin_with_data(secured, 5)
    for token in BAD_TOKENS:
        await bad_token_pipeline(secured, admin, kind, token)
    await assert_untouched(admin, kind, 5)


async def bad_token_pipeline(
    server: ServerProcess, admin: WireClient, kind: int, token: str
) -> None:
    intruder = await open_client(server)
    eid = id_from_str("intruder")
    pipelined = b"".join(
        (
            encode_message(Connect(ConnectMode.TAKEOVER, 5, auth_token=token), 1),
            encode_message(Assert(kind, eid, ROW), 0),
            encode_message(Retract(kind, id_from_int(0)), 0),
            encode_message(Subscribe(kind, SubscribeFlags.BOOTSTRAP), 2),
            encode_message(Query(kind, id_from_int(0)), 3),
            encode_message(ListKinds(), 4),
            encode_message(Sync(), 5),
            encode_message(Heartbeat(), 6),
        )
    )
    intruder.send_raw(pipelined)
    frame, reply = await intruder.reply(1)
    assert isinstance(reply, Error) and reply.code == ErrorCode.AUTH_FAILED, reply
    assert frame.flags & SERVER_CLOSING_FLAG
    await intruder.wait_closed()
    assert intruder.unsolicited.empty()
    assert all(queue.empty() for queue in intruder._replies.values()), "answered after refusal"
    await admin.sync()
    assert (await query(admin, kind, eid)).status is QueryStatus.NOT_FOUND


# --- --max-connections and the read timeout --------------------------------------------------


async def admitted(server: ServerProcess) -> bool:
    """Open a connection: True if it is served (a PONG), False if refused for the limit."""
    candidate = await open_client(server)
    candidate.send(Heartbeat(), 1)
    pong = asyncio.ensure_future(candidate.reply(1))
    refusal = asyncio.ensure_future(candidate.next_unsolicited())
    done, pending = await asyncio.wait((pong, refusal), return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await candidate.close()
    if refusal in done:
        _, message = refusal.result()
        assert isinstance(message, Error) and message.code == ErrorCode.LIMIT_EXCEEDED, message
        return False
    return isinstance(pong.result()[1], Pong)


async def test_max_connections_refuses_the_extra_one_and_frees_slots(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--max-connections", "4") as server:
        held = [await connected(server, ConnectMode.READ_ONLY) for _ in range(3)]
        idle = await open_client(server)  # not connected yet: it holds a slot all the same
        extra = await open_client(server)
        error = await extra.expect_async_error(ErrorCode.LIMIT_EXCEEDED, 0)
        assert "too many connections" in error.message
        await extra.wait_closed()
        assert not await admitted(server)
        for client in held:
            assert isinstance(await client.request(Heartbeat()), Pong)
        await idle.close()
        await until(lambda: admitted(server), "a closed connection's slot goes to a new one")


async def test_idle_and_stalled_connections_are_dropped_after_the_read_timeout(
    tmp_path: Path,
) -> None:
    """Nothing at all, or a lone header, or a frame half-sent: the connection is closed once
    the read timeout passes (not before), and a connected writer's source only starts its
    countdown; a connection that trickles a frame slowly, or sits idle between frames, stays."""
    timeout = 0.6
    async with running_server(tmp_path, "--read-timeout", str(timeout)) as server:
        owner = await connected(server, ConnectMode.CLAIM, source_id=3)
        kind = await register(owner, PLAYER.definition)
        owner.send(Assert(kind, id_from_int(1), ROW))
        await owner.sync()
        await owner.close()
        started = time.monotonic()
        silent = await open_client(server)
        header_only = await open_client(server)
        header_only.send_raw(encode_header(Opcode.CONNECT, 1, 40))
        stalled = await connected(server, ConnectMode.TAKEOVER, source_id=3,
                                  liveness_deadline_ms=60_000)  # fmt: skip
        stalled.send_raw(encode_header(Opcode.ASSERT, 0, len(ROW) + 80) + b"partial")
        trickler = await connected(server, ConnectMode.READ_ONLY)
        quiet = await connected(server, ConnectMode.READ_ONLY, liveness_deadline_ms=60_000)
        trickled = encode_message(Query(kind, id_from_int(1)), 9)

        dropped = [
            (silent, ErrorCode.NOT_CONNECTED, "no CONNECT within 0.6 s"),
            (header_only, ErrorCode.NOT_CONNECTED, "no CONNECT within 0.6 s"),
            (stalled, ErrorCode.BAD_FRAME, "stalled half-received"),
        ]
        for client, code, message in dropped:
            error = await client.expect_async_error(code, 0)
            assert time.monotonic() - started >= timeout, error
            assert message in error.message, error
            await client.wait_closed()
        trickle_started = time.monotonic()
        for index, byte in enumerate(trickled):  # one byte at a time, well within the timeout
            trickler.send_raw(bytes([byte]))
            if index % 8 == 0:
                await asyncio.sleep(timeout / 4)  # the pace under test: slow but never stalled
        _, answer = await trickler.reply(9)
        assert isinstance(answer, QueryResult) and answer.status is QueryStatus.ALIVE
        assert time.monotonic() - trickle_started > timeout  # one frame took longer than it
        assert isinstance(await quiet.request(Heartbeat()), Pong)  # idle between frames: kept

        reader = await connected(server, ConnectMode.READ_ONLY)
        kept = await query(reader, kind, id_from_int(1))
        assert kept.status is QueryStatus.ALIVE  # the stalled writer's source is in its grace
        again = await connected(server, ConnectMode.CLAIM, source_id=3)
        assert isinstance(await again.request(Heartbeat()), Pong)
        assert (await query(reader, kind, id_from_int(1))).source_set == 1 << 3


# --- subscriptions per connection ------------------------------------------------------------


async def test_subscriptions_per_connection_are_limited(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--max-subscriptions", "6") as server:
        writer = await connected(server, ConnectMode.CLAIM, source_id=1)
        kind = await register(writer, PLAYER.definition)
        events = await register(writer, EVENTS)
        reader = await connected(server, ConnectMode.READ_ONLY)
        for stream in range(1, 7):
            request = SubscribeEvents(events) if stream % 3 == 0 else Subscribe(kind)
            assert isinstance(await reader.request(request, stream), Ok)
        for request in (Subscribe(kind, SubscribeFlags.BOOTSTRAP), SubscribeEvents(events)):
            error = await reader.request(request, 7)
            assert isinstance(error, Error) and error.code == ErrorCode.LIMIT_EXCEEDED, error
            assert error.op == request.OPCODE and "max-subscriptions" in error.message
        assert isinstance(await reader.request(Unsubscribe(3), 20), Ok)
        assert isinstance(await reader.request(Subscribe(kind), 7), Ok)  # room again
        other = await connected(server, ConnectMode.READ_ONLY)  # a budget per connection
        assert isinstance(await other.request(Subscribe(kind), 1), Ok)
        writer.send(Assert(kind, id_from_int(1), ROW))
        await writer.sync()
        await reader.sync()
        assert not reader.eof.is_set()  # LIMIT_EXCEEDED does not close


def test_serve_help_shows_the_new_limits() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "convergedb", "serve", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    text = " ".join(result.stdout.split())
    assert "--max-subscriptions" in text and "default: 1024" in text
    assert "--read-timeout" in text and "default: 30.0" in text


# --- payload limits --------------------------------------------------------------------------


async def test_the_payload_limit_is_exact(tmp_path: Path) -> None:
    limit = 4096
    async with running_server(tmp_path, "--max-payload", str(limit)) as server:
        writer = await open_client(server)
        assert (await writer.connect(ConnectMode.CLAIM, source_id=1)).max_payload == limit
        kind = await register(writer, PLAYER.definition)
        body = batch_of_exactly(limit, kind)
        writer.send_raw(encode_frame(Opcode.BATCH, 0, body))
        await writer.sync()
        assert writer.unsolicited.empty(), writer.unsolicited.get_nowait()
        assert (await query(writer, kind, id_from_int(1))).status is QueryStatus.ALIVE
        over = await open_client(server)
        await over.connect(ConnectMode.READ_ONLY)
        over.send_raw(encode_frame(Opcode.BATCH, 0, body + b"\x00"))
        error = await over.expect_async_error(ErrorCode.PAYLOAD_TOO_LARGE, Opcode.BATCH)
        assert str(limit) in error.message
        await over.wait_closed()
        assert isinstance(await writer.request(Heartbeat()), Pong)


def batch_of_exactly(size: int, kind: int) -> bytes:
    """A BATCH payload of exactly `size` bytes: an ASSERT, then a RETRACT whose metadata
    fills the rest."""
    assert_op = Assert(kind, id_from_int(1), ROW).encode()
    retract_head = Retract(kind, id_from_int(0)).encode()[:-2]  # without the empty meta
    meta_size = size - 4 - (5 + len(assert_op)) - (5 + len(retract_head) + 2)
    retract_op = retract_head + struct.pack("<H", meta_size) + bytes(meta_size)
    body = struct.pack("<I", 2)
    body += struct.pack("<BI", Opcode.ASSERT, len(assert_op)) + assert_op
    body += struct.pack("<BI", Opcode.RETRACT, len(retract_op)) + retract_op
    assert len(body) == size
    return body


# --- memory stays bounded under abuse --------------------------------------------------------

REPEATS = 4 if LONG else 2
FLOOD = 120 if LONG else 60
"""Connections per burst of each abuse."""


async def raw_burst(server: ServerProcess, payloads: list[bytes]) -> None:
    """One connection per payload, all at once; wait until the server closed every one."""

    async def one(data: bytes) -> None:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(data)
        try:
            async with asyncio.timeout(15):
                while await reader.read(65536):
                    pass
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    await asyncio.gather(*(one(data) for data in payloads))


def bad_token_connects(count: int) -> list[bytes]:
    return [
        encode_message(Connect(ConnectMode.TAKEOVER, 5, auth_token=f"guess-{i}"), 1)
        + encode_message(Query(2, id_from_int(i)), 2) * 50
        for i in range(count)
    ]


def stalled_frames(count: int, size: int) -> list[bytes]:
    """Headers of big frames followed by most (not all) of their payload: held until the
    read timeout."""
    return [encode_header(Opcode.CONNECT, 1, size) + bytes(size - 1) for _ in range(count)]


def oversize_headers(count: int, limit: int) -> list[bytes]:
    return [encode_header(Opcode.ASSERT, 0, limit + 1 + i) for i in range(count)]


def garbage(count: int) -> list[bytes]:
    rng = random.Random(7)
    return [rng.randbytes(rng.randrange(1, 4096)) for _ in range(count)]


async def quiet_subscriber(server: ServerProcess, kind: int, count: int) -> socket.socket:
    """A connection with `count` bootstrapping subscriptions that never reads a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (server.host, server.port))
    frames = encode_message(Connect(ConnectMode.READ_ONLY), 1) + b"".join(
        encode_message(Subscribe(kind, SubscribeFlags.BOOTSTRAP), stream)
        for stream in range(2, count + 3)  # one more than the limit: refused, not held
    )
    await loop.sock_sendall(sock, frames)
    return sock


@pytest.mark.torture
async def test_memory_stays_bounded_under_abuse(tmp_path: Path) -> None:
    """Each abuse runs in bursts; the server's resident memory after the last burst is within a
    few MiB of what it was after the first (nothing accumulates), within a generous bound of
    where it started, and a well-behaved writer's data is intact throughout."""
    limit = MiB
    args = (*TOKENS, "--max-payload", str(limit), "--read-timeout", "0.4",
            "--max-subscriptions", "16", "--subscriber-buffer", "64", "--no-fsync")  # fmt: skip
    async with running_server(tmp_path, *args) as server:
        good, kind = await admin_with_data(server, 5)
        filler = await connected(server, ConnectMode.CLAIM, source_id=6, auth_token="root")
        rows = [PLAYER.encode(Player(name=f"p{i}", hp=i % 60000)) for i in range(2000)]
        filler.send(Batch(tuple(Assert(kind, id_from_int(1000 + i), r) for i, r in
                                enumerate(rows))))  # fmt: skip
        await filler.sync()

        async def subscription_flood() -> None:
            sock = await quiet_subscriber(server, kind, 16)
            for round_ in range(5):  # every entity changes while nobody reads: merged per entity
                filler.send(Batch(tuple(
                    Assert(kind, id_from_int(1000 + i), PLAYER.encode(Player(hp=round_)))
                    for i in range(2000)
                )))  # fmt: skip
                await filler.sync()
            sock.close()

        abuses: dict[str, Callable[[], Awaitable[None]]] = {
            "bad tokens": lambda: raw_burst(server, bad_token_connects(FLOOD)),
            "stalled big frames": lambda: raw_burst(server, stalled_frames(FLOOD // 4, limit // 2)),
            "oversize headers": lambda: raw_burst(server, oversize_headers(FLOOD, limit)),
            "garbage": lambda: raw_burst(server, garbage(FLOOD)),
            "idle connections": lambda: raw_burst(server, [b""] * FLOOD),
            "subscription flood": subscription_flood,
        }
        for abuse in abuses.values():  # warm every code path once: first-use allocations
            await abuse()
        baseline = rss_bytes(server)
        report = []
        for name, abuse in abuses.items():
            samples = []
            for _ in range(REPEATS):
                await abuse()
                await assert_untouched(good, kind, 5)
                samples.append(rss_bytes(server))
            report.append((name, [s // MiB for s in samples]))
            growth = samples[-1] - samples[0]
            assert growth < 6 * MiB, (name, growth)  # a leak of the stalled frames: 7.5
            assert samples[-1] - baseline < 64 * MiB, (name, samples[-1] - baseline)
        print(f"\nserver RSS (MiB): start {baseline // MiB}, after each burst: {report}")
        server.check_alive()
