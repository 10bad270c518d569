"""Subscriptions over real TCP against a real server (SPEC §8, §11; docs/protocol.md).

Live notifications, bootstrap (full and delta), merging for subscribers that stop reading,
SLOW_SUBSCRIBER, UNSUBSCRIBE, restarts, and disk-backed kinds. Each test waits on frames, SYNC
replies or the connection's end; the only sleep is the one that makes a subscriber time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated

import convergedb as cdb
from convergedb import id_from_int
from convergedb.protocol import (
    SERVER_CLOSING_FLAG,
    Assert,
    Batch,
    BootstrapBegin,
    BootstrapEnd,
    BootstrapMode,
    ChangeType,
    Connect,
    ConnectMode,
    CreateKind,
    DeleteCause,
    Deleted,
    Error,
    ErrorCode,
    FrameReader,
    KindInfo,
    Message,
    Ok,
    Opcode,
    Patch,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
    State,
    Subscribe,
    SubscribeFlags,
    Unsubscribe,
    decode_message,
    encode_header,
    encode_message,
)
from convergedb.server.catalog import KindState
from convergedb.server.engine import Change, ChangeKind
from convergedb.server.events import frame_header, prepare, stream_crc
from convergedb.server.subscriptions import STATE_HEAD, prepare_changes
from convergedb.server.table import Entity
from kinds import PLAYER, Player
from server_fixture import ServerProcess, running_server
from wire_client import WireClient

BOOTSTRAP = SubscribeFlags.BOOTSTRAP
PREVIOUS = SubscribeFlags.INCLUDE_PREVIOUS
RESUME = SubscribeFlags.RESUME
DISK_PLAYER = replace(PLAYER.definition, name="disk_player", disk_backed=True)


@cdb.kind("blob")
class Blob:
    n: Annotated[int, cdb.U32(0)] = 0
    text: Annotated[str, cdb.String(1, max_length=2048)] = ""


BLOB = cdb.kind_model(Blob)


def player(i: int, round_: int = 0) -> bytes:
    return PLAYER.encode(Player(name=f"p{i}", hp=(i + round_) % 65536))


def blob(i: int, round_: int, size: int) -> bytes:
    return BLOB.encode(Blob(n=round_, text=f"{i}:{round_}:".ljust(size, "x")))


# --- a consumer's mirror -------------------------------------------------------------------------


@dataclass
class Mirror:
    """What a consumer keeps of a kind: the highest version of each entity wins, and a DELETED
    removes it (its version is remembered, so an older state cannot bring it back)."""

    versions: dict[bytes, int] = field(default_factory=dict)
    rows: dict[bytes, bytes] = field(default_factory=dict)
    ok: int | None = None
    began: BootstrapBegin | None = None
    ended: BootstrapEnd | None = None
    bootstrap_frames: int = 0
    live_frames: int = 0
    live_seq: int = 0
    """The highest seq of a live notification (they never go down)."""
    highest_seq: int = 0
    """The highest seq seen, the OK value included: where a RESUME starts."""
    messages: list[Message] = field(default_factory=list)
    keep: bool = False
    _target: int = 0
    _reached: asyncio.Event | None = None

    def apply(self, message: Message) -> None:
        if self.keep:
            self.messages.append(message)
        if isinstance(message, State):
            self._seen(message.seq, live=message.type is not ChangeType.BOOTSTRAP)
            if message.type is ChangeType.BOOTSTRAP:
                self.bootstrap_frames += 1
            if message.version > self.versions.get(message.eid, 0):
                self.versions[message.eid] = message.version
                self.rows[message.eid] = message.data
        elif isinstance(message, Deleted):
            in_delta = (
                self.began is not None
                and self.began.mode is BootstrapMode.DELTA
                and self.ended is None
            )
            self._seen(message.seq, live=not in_delta)  # in a delta it may be a bootstrap frame
            if message.version > self.versions.get(message.eid, 0):
                self.versions[message.eid] = message.version
                self.rows.pop(message.eid, None)
        elif isinstance(message, Ok):  # a (new) subscription starts
            self.ok = message.value
            self.began = self.ended = None
            self.highest_seq = max(self.highest_seq, message.value)
        elif isinstance(message, BootstrapBegin):
            assert self.began is None or self.ended is not None, message
            self.began, self.ended = message, None
            self.bootstrap_frames = 0
        elif isinstance(message, BootstrapEnd):
            assert self.began is not None, message
            self.ended = message
        else:
            raise AssertionError(f"unexpected frame on a subscription: {message!r}")

    def _seen(self, seq: int, *, live: bool) -> None:
        self.highest_seq = max(self.highest_seq, seq)
        if live:
            assert seq >= self.live_seq, f"a live seq went down: {seq} after {self.live_seq}"
            self.live_seq = seq
            self.live_frames += 1
            if self._reached is not None and seq >= self._target:
                self._reached.set()

    async def reached(self, seq: int) -> None:
        """Wait until another task, following the subscription, has applied live seq `seq`."""
        if self.live_seq < seq:
            self._target, self._reached = seq, asyncio.Event()
            await self._reached.wait()

    def alive(self) -> dict[bytes, tuple[int, bytes]]:
        return {eid: (self.versions[eid], row) for eid, row in self.rows.items()}


async def follow(
    client: WireClient, sub_id: int, mirror: Mirror, until: Callable[[], bool]
) -> None:
    """Apply the subscription's frames to `mirror` until `until()` holds."""
    while not until():
        _, message = await client.reply(sub_id)
        mirror.apply(message)


async def follow_to(client: WireClient, sub_id: int, mirror: Mirror, seq: int) -> None:
    """Until the bootstrap (if any) has ended and a live notification of flush `seq` arrived.

    Live seqs never go down, so every change of the flushes before `seq` has been received; when
    flush `seq` changed one entity only, so has every change up to it (see `barrier`).
    """
    await follow(
        client,
        sub_id,
        mirror,
        lambda: (mirror.began is None or mirror.ended is not None) and mirror.live_seq >= seq,
    )


MARKER = id_from_int(10**12)
"""The entity `barrier` writes."""


async def barrier(
    writer: WireClient, kind: int, row: bytes, client: WireClient, sub_id: int, mirror: Mirror
) -> None:
    """Make sure `mirror` has every change committed so far: write one entity alone in a flush
    (after the writer's earlier writes) and wait for its notification."""
    writer.send(Assert(kind, MARKER, row))
    await follow_to(client, sub_id, mirror, await writer.sync())


# --- clients -------------------------------------------------------------------------------------


async def writer_client(server: ServerProcess, source_id: int) -> WireClient:
    client = await WireClient.open(server.host, server.port)
    await client.connect(ConnectMode.CLAIM, source_id=source_id)
    return client


async def reader_client(server: ServerProcess) -> WireClient:
    client = await WireClient.open(server.host, server.port)
    await client.connect(ConnectMode.READ_ONLY)
    return client


async def register(client: WireClient, definition: object) -> int:
    reply = await client.request(CreateKind(definition))  # type: ignore[arg-type]
    assert isinstance(reply, KindInfo), reply
    return reply.kind_id


async def subscribe(
    client: WireClient,
    kind: int,
    flags: SubscribeFlags = SubscribeFlags.NONE,
    since: int = 0,
    mirror: Mirror | None = None,
) -> int:
    """SUBSCRIBE; the subscription id (its OK goes to `mirror` when given)."""
    sub_id = client.next_stream()
    client.send(Subscribe(kind, flags, since), sub_id)
    _, reply = await client.reply(sub_id)
    assert isinstance(reply, Ok), reply
    if mirror is not None:
        mirror.apply(reply)
    return sub_id


async def server_alive(
    client: WireClient, kind: int, eids: Sequence[bytes]
) -> dict[bytes, tuple[int, bytes]]:
    """The server's alive entities among `eids` (version, row), by pipelined QUERYs."""
    streams = []
    for eid in eids:
        stream = client.next_stream()
        client.send(Query(kind, eid), stream)
        streams.append((eid, stream))
    alive = {}
    for eid, stream in streams:
        _, result = await client.reply(stream)
        assert isinstance(result, QueryResult), result
        if result.status is QueryStatus.ALIVE:
            alive[eid] = (result.version, result.data)
    return alive


class GatedClient(WireClient):
    """A raw client that can stop reading. Its socket has a tiny receive buffer, so the server's
    side backs up soon after it stops."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        super().__init__(reader, writer)

    @classmethod
    async def open_small(cls, host: str, port: int, rcvbuf: int = 4096) -> GatedClient:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        return cls(reader, writer)

    async def _read(self) -> None:
        try:
            while True:
                await self.gate.wait()
                data = await self._reader.read(65536)
                if not data:
                    break
                for frame in self._frames.feed(data):
                    message = decode_message(frame.opcode, frame.payload)
                    if frame.stream_id == 0:
                        self.unsolicited.put_nowait((frame, message))
                    else:
                        queue = self._replies.setdefault(frame.stream_id, asyncio.Queue())
                        queue.put_nowait((frame, message))
        except (ConnectionError, OSError):
            pass
        finally:
            self.eof.set()


class LeanSubscriber:
    """A subscriber that parses only what a mirror needs from STATE frames (no message objects):
    fast enough that the test process keeps up with 100,000 notifications."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = FrameReader(max_payload=0xFFFF_FFFF)
        self.mirror = Mirror()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def subscribe(cls, server: ServerProcess, kind: int) -> LeanSubscriber:
        """Connect read-only, SUBSCRIBE with bootstrap, and read the replies from now on."""
        reader, writer = await asyncio.open_connection(server.host, server.port)
        client = cls(reader, writer)
        writer.write(encode_message(Connect(ConnectMode.READ_ONLY), 1))
        writer.write(encode_message(Subscribe(kind, BOOTSTRAP), 2))
        client._task = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        mirror = self.mirror
        versions, rows = mirror.versions, mirror.rows
        unpack = STATE_HEAD.unpack_from
        head_size = STATE_HEAD.size
        while data := await self._reader.read(262_144):
            for frame in self._frames.feed(data):
                if frame.opcode != Opcode.STATE:
                    message = decode_message(frame.opcode, frame.payload)
                    if frame.stream_id == 2:
                        mirror.apply(message)
                    continue
                payload = frame.payload
                _, eid, change, version, _, _, seq, size = unpack(payload)
                if change == ChangeType.BOOTSTRAP:
                    mirror.bootstrap_frames += 1
                else:
                    mirror._seen(seq, live=True)
                if version > versions.get(eid, 0):
                    versions[eid] = version
                    rows[eid] = bytes(payload[head_size : head_size + size])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()


def rss_bytes(server: ServerProcess) -> int:
    """The server process's resident set size."""
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- the encoders --------------------------------------------------------------------------------


def test_prepared_frames_are_the_message_encoders_bytes() -> None:
    """The fan-out's one-off encoders and per-subscriber headers give exactly the frames of the
    protocol's message classes, for every change type and stream id."""
    kind = KindState(7, PLAYER.definition, (len(PLAYER.definition.fields),))
    eid = id_from_int(42)
    before, after = player(1), player(1, 5)
    mask = kind.codec.changed_fields(before, after)
    changes = [
        Change(kind, eid, ChangeKind.CREATED, Entity(before, 1, 6, 10, 1, 0, 0), None, b"m1"),
        Change(kind, eid, ChangeKind.UPDATED, Entity(after, 2, 6, 11, 1, 0, 0), before, b""),
        Change(kind, eid, ChangeKind.DELETED, Entity(b"", 3, 0, 12, 1, 1, 99), after, b"m3"),
    ]
    masks = [change.changed_fields() for change in changes]
    assert masks == [kind.codec.all_fields_mask, mask, kind.codec.all_fields_mask]
    plain = prepare_changes(changes, masks, False)
    full = prepare_changes(changes, masks, True, plain)
    expected_plain: list[Message] = [
        State(7, eid, ChangeType.CREATED, 1, 6, masks[0], 10, before, b"", b"m1"),
        State(7, eid, ChangeType.UPDATED, 2, 6, mask, 11, after, b"", b""),
        Deleted(7, eid, 3, 12, DeleteCause.EPOCH_END, b"", b"m3"),
    ]
    expected_full: list[Message] = [
        expected_plain[0],
        State(7, eid, ChangeType.UPDATED, 2, 6, mask, 11, after, before, b""),
        Deleted(7, eid, 3, 12, DeleteCause.EPOCH_END, after, b"m3"),
    ]
    for stream in (1, 2, 255, 256, 4660, 65535):
        crc = stream_crc(stream)
        for frames, messages in ((plain, expected_plain), (full, expected_full)):
            for frame, message in zip(frames, messages, strict=True):
                assert frame_header(frame, stream, crc) + frame.payload == encode_message(
                    message, stream
                )
    for opcode, size in ((Opcode.OK, 8), (Opcode.STATE, 0), (Opcode.EVENT, 70_000)):
        frame = prepare(opcode, bytes(size))
        for stream in range(0, 65536, 97):
            assert frame_header(frame, stream, stream_crc(stream)) == encode_header(
                opcode, stream, size
            )


# --- live notifications --------------------------------------------------------------------------


async def test_live_notifications_carry_version_sources_fields_seq_previous_and_meta(
    server: ServerProcess,
) -> None:
    a, b = await writer_client(server, 1), await writer_client(server, 2)
    kind = await register(a, PLAYER.definition)
    reader = await reader_client(server)
    committed = await a.sync()
    plain, with_previous = Mirror(keep=True), Mirror(keep=True)
    plain_id = await subscribe(reader, kind, mirror=plain)
    previous_id = await subscribe(reader, kind, PREVIOUS, mirror=with_previous)
    assert plain.ok == with_previous.ok == committed  # the committed seq at registration
    e1 = id_from_int(1)
    row1 = PLAYER.encode(Player(name="ana", hp=10))
    a.send(Assert(kind, e1, row1, b"spawn"))
    s1 = await a.sync()
    b.send(Assert(kind, e1, row1, b"same bytes"))  # the source set alone: no notification
    mask, values = PLAYER.patch({"hp": 9})
    b.send(Patch(kind, e1, mask, values, b"hit"))
    s2 = await b.sync()
    row2 = PLAYER.encode(Player(name="ana", hp=9))
    a.send(Retract(kind, e1, b"a leaves"))  # b still asserts it: no notification
    b.send(Retract(kind, e1, b"b leaves"))
    s3 = await b.sync()
    assert committed < s1 < s2 < s3
    for sub_id, mirror in ((plain_id, plain), (previous_id, with_previous)):
        await follow_to(reader, sub_id, mirror, s3)
    all_fields = (1 << len(PLAYER.definition.fields)) - 1
    hp_bit = 1 << 1
    assert plain.messages[1:] == [
        State(kind, e1, ChangeType.CREATED, 1, 0b10, all_fields, s1, row1, b"", b"spawn"),
        State(kind, e1, ChangeType.UPDATED, 2, 0b110, hp_bit, s2, row2, b"", b"hit"),
        Deleted(kind, e1, 3, s3, DeleteCause.RETRACTED, b"", b"b leaves"),
    ]
    assert with_previous.messages[1:] == [
        State(kind, e1, ChangeType.CREATED, 1, 0b10, all_fields, s1, row1, b"", b"spawn"),
        State(kind, e1, ChangeType.UPDATED, 2, 0b110, hp_bit, s2, row2, row1, b"hit"),
        Deleted(kind, e1, 3, s3, DeleteCause.RETRACTED, row2, b"b leaves"),
    ]


async def test_the_changes_of_one_flush_share_a_seq_and_arrive_together(
    server: ServerProcess,
) -> None:
    writer = await writer_client(server, 1)
    kind = await register(writer, PLAYER.definition)
    reader = await reader_client(server)
    mirror = Mirror(keep=True)
    sub_id = await subscribe(reader, kind, mirror=mirror)
    seqs = []
    for round_ in range(3):
        writer.send(
            Batch(tuple(Assert(kind, id_from_int(i), player(i, round_)) for i in range(50)))
        )
        seqs.append(await writer.sync())
    await follow(reader, sub_id, mirror, lambda: mirror.live_frames == 150)
    states = [message for message in mirror.messages if isinstance(message, State)]
    assert [state.seq for state in states] == [seq for seq in seqs for _ in range(50)]
    assert [state.eid for state in states] == [id_from_int(i) for _ in seqs for i in range(50)]


# --- bootstrap -----------------------------------------------------------------------------------


async def test_a_bootstrap_sends_every_alive_entity_without_metadata(server: ServerProcess) -> None:
    writer = await writer_client(server, 3)
    kind = await register(writer, PLAYER.definition)
    writer.send(Batch(tuple(Assert(kind, id_from_int(i), player(i), b"m") for i in range(30))))
    first = await writer.sync()
    writer.send(Batch(tuple(Retract(kind, id_from_int(i), b"gone") for i in range(10))))
    writer.send(Batch(tuple(Assert(kind, id_from_int(i), player(i, 1)) for i in range(25, 30))))
    second = await writer.sync()
    reader = await reader_client(server)
    mirror = Mirror(keep=True)
    sub_id = await subscribe(reader, kind, BOOTSTRAP | PREVIOUS, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    assert mirror.ok == second
    assert mirror.began == BootstrapBegin(kind, BootstrapMode.FULL, 20)
    assert mirror.ended == BootstrapEnd(kind, 20)
    states = mirror.messages[2:-1]
    all_fields = (1 << len(PLAYER.definition.fields)) - 1
    expected = {
        id_from_int(i): State(
            kind,
            id_from_int(i),
            ChangeType.BOOTSTRAP,
            2 if i >= 25 else 1,
            1 << 3,
            all_fields,
            second if i >= 25 else first,
            player(i, 1 if i >= 25 else 0),
        )
        for i in range(10, 30)
    }
    assert {state.eid: state for state in states if isinstance(state, State)} == expected
    assert len(states) == 20


async def test_a_bootstrap_under_concurrent_writes_converges_to_the_server_state(
    server: ServerProcess,
) -> None:
    """Thousands of entities written by three sources while a subscriber bootstraps: its mirror
    ends equal to the server's state, entity by entity."""
    writers = [await writer_client(server, source) for source in (1, 2, 3)]
    kind = await register(writers[0], PLAYER.definition)
    count = 4000
    eids = [id_from_int(i) for i in range(count + 500)]
    for w, client in enumerate(writers):
        mine = range(w, count, 3)
        client.send(Batch(tuple(Assert(kind, eids[i], player(i)) for i in mine)))
    for client in writers:
        await client.sync()
    rng = random.Random(5)

    async def keep_writing(client: WireClient, rounds: int) -> int:
        for round_ in range(1, rounds + 1):
            ops: list[Assert | Patch | Retract] = []
            for i in rng.sample(range(len(eids)), 150):
                roll = rng.random()
                if roll < 0.5:
                    ops.append(Assert(kind, eids[i], player(i, round_), b"w"))
                elif roll < 0.8:
                    mask, values = PLAYER.patch({"hp": round_})
                    ops.append(Patch(kind, eids[i], mask, values))
                else:
                    ops.append(Retract(kind, eids[i]))
            client.send(Batch(tuple(ops)))
            if round_ % 5 == 0:
                await client.sync()
        return await client.sync()

    reader = await reader_client(server)
    mirror = Mirror()
    writing = [asyncio.create_task(keep_writing(client, 40)) for client in writers]
    sub_id = await subscribe(reader, kind, BOOTSTRAP, mirror=mirror)
    consuming = asyncio.create_task(
        follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    )
    await asyncio.gather(*writing)
    await consuming
    assert mirror.began is not None and mirror.ended is not None
    assert mirror.ended.count == mirror.bootstrap_frames
    await barrier(writers[0], kind, player(0, 99), reader, sub_id, mirror)
    assert mirror.alive() == await server_alive(writers[0], kind, [*eids, MARKER])
    assert 1000 < len(mirror.alive()) < len(eids)


async def test_resume_gets_only_what_changed_and_converges(server: ServerProcess) -> None:
    """RESUME after 1% of 10,000 entities changed sends those (a delta), not 10,000."""
    writer = await writer_client(server, 1)
    kind = await register(writer, PLAYER.definition)
    eids = [id_from_int(i) for i in range(10_100)]
    writer.send(Batch(tuple(Assert(kind, eids[i], player(i)) for i in range(10_000))))
    await writer.sync()
    reader = await reader_client(server)
    mirror = Mirror()
    sub_id = await subscribe(reader, kind, BOOTSTRAP, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    assert mirror.bootstrap_frames == 10_000
    await reader.close()  # the subscriber goes away; 1% changes meanwhile

    writer.send(Batch(tuple(Assert(kind, eids[i], player(i, 1)) for i in range(0, 6000, 100))))
    writer.send(Batch(tuple(Retract(kind, eids[i]) for i in range(50, 4050, 200))))
    writer.send(Batch(tuple(Assert(kind, eids[i], player(i)) for i in range(10_000, 10_020))))
    committed = await writer.sync()

    reader = await reader_client(server)
    sub_id = await subscribe(reader, kind, RESUME, mirror.highest_seq, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    assert mirror.ok == committed
    assert mirror.began == BootstrapBegin(kind, BootstrapMode.DELTA, 100)
    assert mirror.ended == BootstrapEnd(kind, 100)
    assert mirror.alive() == await server_alive(writer, kind, eids)
    assert len(mirror.alive()) == 10_000

    # since 0, or above the committed seq: a full bootstrap
    for since in (0, committed + 1000):
        full = Mirror()
        sub_id = await subscribe(reader, kind, RESUME, since, mirror=full)
        await follow(reader, sub_id, full, lambda m=full: m.ended is not None)  # type: ignore[misc]
        assert full.began == BootstrapBegin(kind, BootstrapMode.FULL, 10_000)
        assert full.alive() == mirror.alive()


async def test_a_disk_backed_kind_bootstraps_from_the_store(server: ServerProcess) -> None:
    writer = await writer_client(server, 1)
    kind = await register(writer, DISK_PLAYER)
    eids = [id_from_int(i) for i in range(1500)]
    writer.send(Batch(tuple(Assert(kind, eid, player(i)) for i, eid in enumerate(eids))))
    writer.send(Batch(tuple(Retract(kind, eids[i]) for i in range(0, 1500, 15))))
    await writer.sync()
    reader = await reader_client(server)
    mirror = Mirror()
    sub_id = await subscribe(reader, kind, BOOTSTRAP, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    assert mirror.began == BootstrapBegin(kind, BootstrapMode.FULL, 1400)
    assert mirror.ended == BootstrapEnd(kind, 1400)
    assert mirror.alive() == await server_alive(writer, kind, eids)

    resumed_from = mirror.highest_seq
    await reader.close()
    writer.send(Batch(tuple(Retract(kind, eids[i], b"bye") for i in range(1, 1500, 150))))
    writer.send(Batch(tuple(Assert(kind, eids[i], player(i, 2)) for i in range(2, 1500, 75))))
    await writer.sync()
    reader = await reader_client(server)
    delta = Mirror(keep=True)
    sub_id = await subscribe(reader, kind, RESUME, resumed_from, mirror=delta)
    await follow(reader, sub_id, delta, lambda: delta.ended is not None)
    assert delta.began == BootstrapBegin(kind, BootstrapMode.DELTA, 30)
    deleted = [message for message in delta.messages if isinstance(message, Deleted)]
    assert len(deleted) == 10
    assert all(d.cause is DeleteCause.RETRACTED and not d.meta for d in deleted)
    for message in delta.messages[2:]:
        mirror.apply(message)
    assert mirror.alive() == await server_alive(writer, kind, eids)


# --- subscription requests -----------------------------------------------------------------------


async def test_unsubscribe_unknown_kind_and_duplicate_ids(server: ServerProcess) -> None:
    writer = await writer_client(server, 1)
    kind = await register(writer, PLAYER.definition)
    reader = await reader_client(server)
    reply = await reader.request(Subscribe(999))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_KIND, reply
    assert reply.op == Opcode.SUBSCRIBE
    first, second = Mirror(keep=True), Mirror(keep=True)
    first_id = await subscribe(reader, kind, mirror=first)
    reply = await reader.request(Subscribe(kind), first_id)  # that id is live on this connection
    assert isinstance(reply, Error) and reply.code == ErrorCode.MALFORMED, reply
    second_id = await subscribe(reader, kind, mirror=second)

    assert await reader.request(Unsubscribe(first_id)) == Ok(0)
    writer.send(Assert(kind, id_from_int(1), player(1)))
    seq = await writer.sync()
    await follow_to(reader, second_id, second, seq)  # the other subscription still gets it
    await reader.sync()  # the first one's frames would have come before this reply
    assert reader._replies[first_id].empty()
    reply = await reader.request(Unsubscribe(first_id))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_SUBSCRIPTION, reply
    assert reply.op == Opcode.UNSUBSCRIBE
    again = Mirror()
    reused = Mirror()
    reader.send(Subscribe(kind), first_id)  # an id is free again once unsubscribed
    await follow(reader, first_id, reused, lambda: reused.ok is not None)
    assert await subscribe(reader, kind, mirror=again) != second_id


# --- slow subscribers ----------------------------------------------------------------------------


async def test_a_subscriber_that_stops_reading_is_merged_and_converges(tmp_path: Path) -> None:
    """100,000 writes to 1,000 entities while a subscriber reads nothing: the server holds at
    most one merged change per entity for it, writers and a fast subscriber are not slowed, and
    once it reads again its mirror converges exactly."""
    args = ("--subscriber-buffer", "256", "--no-fsync", "--window-ms", "5")
    async with running_server(tmp_path, *args) as server:
        writer = await writer_client(server, 1)
        kind = await register(writer, BLOB.definition)
        eids = [id_from_int(i) for i in range(1000)]
        writer.send(Batch(tuple(Assert(kind, eid, blob(i, 0, 300)) for i, eid in enumerate(eids))))
        await writer.sync()

        rounds = [
            encode_message(
                Batch(tuple(Assert(kind, eid, blob(i, round_, 200)) for i, eid in enumerate(eids)))
            )
            for round_ in range(1, 101)
        ]
        fast = await LeanSubscriber.subscribe(server, kind)
        fast_mirror = fast.mirror
        slow = await GatedClient.open_small(server.host, server.port)
        await slow.connect(ConnectMode.READ_ONLY)
        slow_mirror = Mirror()
        slow_id = await subscribe(slow, kind, BOOTSTRAP, mirror=slow_mirror)
        await follow(slow, slow_id, slow_mirror, lambda: slow_mirror.ended is not None)

        slow.gate.clear()
        rss_before = rss_bytes(server)
        for batch in rounds:  # 100 flushes of 1,000 changes; every SYNC is answered
            writer.send_raw(batch)
            await writer.sync()
        rss_grown = rss_bytes(server) - rss_before
        unmerged_bytes = 100_000 * (len(blob(0, 0, 200)) + 100)

        writer.send(Assert(kind, MARKER, blob(0, 0, 10)))
        last = await writer.sync()
        await asyncio.wait_for(fast_mirror.reached(last), 20)
        await fast.close()
        assert fast_mirror.bootstrap_frames == 1000
        assert fast_mirror.live_frames == 100_001  # every change, one notification each
        assert rss_grown < unmerged_bytes / 3, (rss_grown, unmerged_bytes)

        slow.gate.set()
        await follow_to(slow, slow_id, slow_mirror, last)
        assert slow_mirror.live_frames < 30_000, slow_mirror.live_frames
        server_state = await server_alive(writer, kind, [*eids, MARKER])
        assert slow_mirror.alive() == server_state == fast_mirror.alive()
        assert [version for version, _ in server_state.values()] == [101] * 1000 + [1]
        await slow.close()
    merged = [
        int(line.rsplit("caught up: ", 1)[1].split()[0])
        for line in server.stderr_path.read_text().splitlines()
        if "caught up: " in line
    ]
    assert merged and max(merged) <= len(eids) + 1, merged  # one per entity (and the marker)


async def test_a_subscriber_that_reads_nothing_is_closed_with_slow_subscriber(
    tmp_path: Path,
) -> None:
    args = ("--subscriber-timeout", "1", "--subscriber-buffer", "64", "--no-fsync")
    async with running_server(tmp_path, *args) as server:
        writer = await writer_client(server, 1)
        kind = await register(writer, BLOB.definition)
        quiet_kind = await register(writer, PLAYER.definition)
        idle = await GatedClient.open_small(server.host, server.port)
        await idle.connect(ConnectMode.READ_ONLY)
        await subscribe(idle, quiet_kind)  # nothing pending for it: never dropped
        idle.gate.clear()
        slow = await GatedClient.open_small(server.host, server.port)
        await slow.connect(ConnectMode.READ_ONLY)
        await subscribe(slow, kind)
        slow.gate.clear()
        for round_ in range(6):
            ops = tuple(Assert(kind, id_from_int(i), blob(i, round_, 2000)) for i in range(1000))
            writer.send(Batch(ops))
            await writer.sync()
        await asyncio.sleep(2.5)  # the cause: past the 1 s subscriber timeout, reading nothing
        slow.gate.set()
        await slow.wait_closed()
        frame, message = await slow.next_unsolicited()
        assert isinstance(message, Error) and message.code == ErrorCode.SLOW_SUBSCRIBER, message
        assert frame.flags & SERVER_CLOSING_FLAG and message.op == 0
        idle.gate.set()
        await idle.sync()
        assert idle.unsolicited.empty()
        await writer.sync()


# --- restarts ------------------------------------------------------------------------------------


async def test_a_restart_ends_the_connection_and_a_resume_converges(server: ServerProcess) -> None:
    writer = await writer_client(server, 1)
    kind = await register(writer, PLAYER.definition)
    eids = [id_from_int(i) for i in range(300)]
    writer.send(Batch(tuple(Assert(kind, eid, player(i)) for i, eid in enumerate(eids[:200]))))
    await writer.sync()
    reader = await reader_client(server)
    mirror = Mirror()
    sub_id = await subscribe(reader, kind, BOOTSTRAP, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)

    await server.restart()
    await reader.wait_closed()
    _, message = await reader.next_unsolicited()
    assert isinstance(message, Error) and message.code == ErrorCode.SHUTTING_DOWN, message

    writer = await writer_client(server, 1)
    writer.send(Batch(tuple(Assert(kind, eids[i], player(i, 3)) for i in range(0, 300, 10))))
    writer.send(Batch(tuple(Retract(kind, eids[i]) for i in range(5, 200, 20))))
    await writer.sync()
    reader = await reader_client(server)
    sub_id = await subscribe(reader, kind, RESUME, mirror.highest_seq, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    assert mirror.began == BootstrapBegin(kind, BootstrapMode.DELTA, 40)
    assert mirror.alive() == await server_alive(writer, kind, eids)


async def test_resume_past_the_compaction_horizon_falls_back_to_full(tmp_path: Path) -> None:
    """A tombstone newer than since_seq was compacted: a delta would miss that deletion."""
    async with running_server(tmp_path, "--tombstone-retention", "0.3") as server:
        writer = await writer_client(server, 1)
        kind = await register(writer, PLAYER.definition)
        eids = [id_from_int(i) for i in range(20)]
        writer.send(Batch(tuple(Assert(kind, eid, player(i)) for i, eid in enumerate(eids))))
        await writer.sync()
        reader = await reader_client(server)
        mirror = Mirror()
        sub_id = await subscribe(reader, kind, BOOTSTRAP, mirror=mirror)
        await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
        since = mirror.highest_seq
        await reader.close()

        writer.send(Retract(kind, eids[3]))
        await writer.sync()
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # wait for compaction to remove the tombstone (a condition, polled)
            result = await writer.request(Query(kind, eids[3]))
            assert isinstance(result, QueryResult)
            if result.status is QueryStatus.NOT_FOUND:
                break
            assert asyncio.get_running_loop().time() < deadline, "never compacted"
            await asyncio.sleep(0.05)

        reader = await reader_client(server)
        full = Mirror()
        sub_id = await subscribe(reader, kind, RESUME, since, mirror=full)
        await follow(reader, sub_id, full, lambda: full.ended is not None)
        assert full.began == BootstrapBegin(kind, BootstrapMode.FULL, 19)
        assert full.alive() == await server_alive(writer, kind, eids)


async def test_resume_at_scale_sends_the_changed_percent(server: ServerProcess) -> None:
    """RESUME after 1% of 100,000 entities changed: about 1,000 frames, not 100,000; the
    resumed mirror ends equal to a fresh full bootstrap of the server's state."""
    writer = await writer_client(server, 1)
    kind = await register(writer, PLAYER.definition)
    eids = [id_from_int(i) for i in range(100_000)]
    for start in range(0, 100_000, 5000):
        writer.send(
            Batch(tuple(Assert(kind, eids[i], player(i)) for i in range(start, start + 5000)))
        )
    await writer.sync()
    reader = await reader_client(server)
    mirror = Mirror()
    sub_id = await subscribe(reader, kind, BOOTSTRAP, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    assert mirror.bootstrap_frames == 100_000
    await reader.close()

    writer.send(Batch(tuple(Assert(kind, eids[i], player(i, 1)) for i in range(0, 100_000, 100))))
    writer.send(Batch(tuple(Retract(kind, eids[i]) for i in range(50, 100_000, 10_000))))
    await writer.sync()

    reader = await reader_client(server)
    sub_id = await subscribe(reader, kind, RESUME, mirror.highest_seq, mirror=mirror)
    await follow(reader, sub_id, mirror, lambda: mirror.ended is not None)
    assert mirror.began == BootstrapBegin(kind, BootstrapMode.DELTA, 1010)
    fresh = Mirror()
    sub_id = await subscribe(reader, kind, BOOTSTRAP, mirror=fresh)
    await follow(reader, sub_id, fresh, lambda: fresh.ended is not None)
    assert mirror.alive() == fresh.alive()
    assert len(fresh.alive()) == 100_000 - 10
