"""Subscriptions: typed changes, bootstrap, closing, backpressure, RESUME / LIVE_ONLY after a
disconnect, slow subscribers, and event streams with per-op metadata.

The first part drives a subscription with a fake connection to check its bookkeeping (what it
sends again after a reconnection, when it holds the socket); the rest runs against a server.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any, cast

import pytest

import convergedb as cdb
from convergedb.client.connection import Connection
from convergedb.protocol.codes import (
    BootstrapMode,
    DeleteCause,
    ErrorCode,
    EventCause,
    Opcode,
    SubscribeFlags,
)
from convergedb.protocol.codes import ChangeType as WireType
from convergedb.protocol.messages import (
    BootstrapBegin,
    BootstrapEnd,
    Deleted,
    Error,
    Event,
    Message,
    Ok,
    State,
    Subscribe,
    SubscribeEvents,
)
from server_fixture import ServerProcess, running_server
from test_client_mirror import assert_mirror_matches_server
from test_client_reconnect import Proxy, Reconnections, eventually

TIMEOUT = 15.0


@pytest.fixture
async def proxy(server: ServerProcess) -> AsyncIterator[Proxy]:
    """A proxy to the server (see `test_client_reconnect.Proxy`)."""
    instance = Proxy(*server.address)
    await instance.start()
    yield instance
    await instance.close()


@cdb.kind("sub_item")
class Item:
    name: Annotated[str, cdb.String(0, max_length=200)] = ""
    hp: Annotated[int, cdb.U32(1)] = 0
    tags: Annotated[list[int], cdb.Array(2, cdb.U16(), max_count=8)] = []


@cdb.kind("sub_log", event_stream=True)
class Log:
    name: Annotated[str, cdb.String(0, max_length=16)] = ""
    hp: Annotated[int, cdb.U32(1)] = 0


ALL_FIELDS = 0b111


# --- bookkeeping, with a fake connection ------------------------------------------------------


class FakeConnection:
    """Records what a subscription sends and which reading holds it takes."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.holds: set[object] = set()
        self.is_lost = False

    def open_subscription(self, message: Message, sink: object) -> int:
        self.sent.append(message)
        return len(self.sent)

    def hold_reading(self, owner: object) -> None:
        self.holds.add(owner)

    def release_reading(self, owner: object) -> None:
        self.holds.discard(owner)

    @contextlib.contextmanager
    def expecting_reply(self) -> Iterator[None]:
        yield


class FakeClient:
    """The little of `Client` a subscription uses."""

    def __init__(self) -> None:
        self.connection = FakeConnection()

    def _attach_subscription(self, subscription: object) -> FakeConnection:
        return self.connection

    def _detach_subscription(self, subscription: object) -> None:
        pass

    def _will_reconnect(self) -> bool:
        return True


def fake_handle(kind: type[Any] = Item) -> tuple[cdb.KindHandle[Any], FakeClient]:
    client = FakeClient()
    model = cdb.kind_model(kind)
    handle = cdb.KindHandle(cast(cdb.Client, client), model, 5, 1, model.definition)
    return handle, client


def state(key: int, seq: int, wire: WireType = WireType.UPDATED, version: int = 1) -> State:
    row = cdb.kind_model(Item).encode(Item(f"i{key}", key))
    return State(5, cdb.id_from_int(key), wire, version, 1, ALL_FIELDS, seq, row)


async def started(subscription: Any, accepted_seq: int) -> None:
    """Start the subscription against the fake, answering its SUBSCRIBE with OK."""
    task = asyncio.ensure_future(subscription.start())
    await asyncio.sleep(0)
    subscription.deliver(Ok(accepted_seq))
    await task


def as_connection(fake: FakeConnection) -> Connection:
    return cast(Connection, fake)


async def drain(subscription: Any) -> list[Any]:
    items = []
    while subscription.pending:
        items.append(await anext(subscription))
    return items


async def test_resume_asks_from_the_last_complete_flush() -> None:
    handle, client = fake_handle()
    sub = handle.subscribe(include_previous=True)
    await started(sub, 10)
    assert client.connection.sent == [
        Subscribe(5, SubscribeFlags.BOOTSTRAP | SubscribeFlags.INCLUDE_PREVIOUS, 0)
    ]
    for message in (
        BootstrapBegin(5, BootstrapMode.FULL, 2),
        state(1, 3, WireType.BOOTSTRAP),
        state(2, 12),  # live, during the bootstrap
        state(2, 11, WireType.BOOTSTRAP),
    ):
        sub.deliver(message)
    assert sub.resume_seq == 0 and sub.bootstrapping  # an unfinished bootstrap resumes nothing
    sub.deliver(BootstrapEnd(5, 2))
    assert sub.resume_seq == 11 and sub.seq == 12  # flush 12 may have been cut: ask it again
    sub.deliver(Deleted(5, cdb.id_from_int(1), 2, 15, DeleteCause.RETRACTED))
    assert sub.resume_seq == 14

    sub.fail(cdb.ConnectionLost("reset"))
    assert sub.active and not sub.closed
    again = FakeConnection()
    sub._resubscribe(as_connection(again))
    flags = SubscribeFlags.BOOTSTRAP | SubscribeFlags.RESUME | SubscribeFlags.INCLUDE_PREVIOUS
    assert again.sent == [Subscribe(5, flags, 14)]
    sub.deliver(Ok(20))
    sub.deliver(BootstrapBegin(5, BootstrapMode.DELTA, 1))
    sub.deliver(state(3, 22))
    sub.fail(cdb.ConnectionLost("reset again"))  # the delta was cut: ask from 14 again
    third = FakeConnection()
    sub._resubscribe(as_connection(third))
    assert third.sent == [Subscribe(5, flags, 14)]

    items = await drain(sub)
    kinds = [type(item).__name__ for item in items]
    assert kinds == [
        "BootstrapStarted",
        "Change",
        "Change",
        "Change",
        "BootstrapComplete",
        "Change",
        "Resubscribed",
        "BootstrapStarted",
        "Change",
        "Resubscribed",
    ]
    assert items[0] == cdb.BootstrapStarted(BootstrapMode.FULL, 2, False)
    assert items[4] == cdb.BootstrapComplete(BootstrapMode.FULL, 2)
    assert items[5].type is cdb.ChangeType.DELETED and items[5].cause is DeleteCause.RETRACTED
    assert items[6] == cdb.Resubscribed(cdb.ReconnectMode.RESUME, 14)
    assert items[7] == cdb.BootstrapStarted(BootstrapMode.DELTA, 1, True)
    assert sub.resubscriptions == 2


@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        (cdb.ReconnectMode.LIVE_ONLY, SubscribeFlags.NONE),
        (cdb.ReconnectMode.FULL, SubscribeFlags.BOOTSTRAP),
        (cdb.ReconnectMode.RESUME, SubscribeFlags.BOOTSTRAP | SubscribeFlags.RESUME),
    ],
)
async def test_each_mode_subscribes_again_its_way(
    mode: cdb.ReconnectMode, flags: SubscribeFlags
) -> None:
    handle, client = fake_handle()
    sub = handle.subscribe(bootstrap=False, mode=mode)
    await started(sub, 30)
    assert client.connection.sent == [Subscribe(5, SubscribeFlags.NONE, 0)]
    sub.fail(cdb.ConnectionLost("reset"))
    again = FakeConnection()
    sub._resubscribe(as_connection(again))
    since = 30 if mode is cdb.ReconnectMode.RESUME else 0
    assert again.sent == [Subscribe(5, flags, since)]
    assert await drain(sub) == [cdb.Resubscribed(mode, since)]


async def test_a_full_queue_holds_the_socket_until_half_is_taken() -> None:
    handle, client = fake_handle()
    sub = handle.subscribe(bootstrap=False, max_queue=4)
    await started(sub, 1)
    for seq in range(2, 5):
        sub.deliver(state(seq, seq))
    assert not client.connection.holds
    sub.deliver(state(5, 5))
    assert client.connection.holds == {sub}
    await anext(sub)
    assert client.connection.holds == {sub}  # 3 left: above half
    await anext(sub)
    assert not client.connection.holds  # 2 left
    with pytest.raises(ValueError, match="max_queue"):
        handle.subscribe(max_queue=0)


async def test_an_event_stream_resumes_after_the_last_event() -> None:
    handle, client = fake_handle(Log)
    sub = handle.subscribe_events()
    await started(sub, 7)
    assert client.connection.sent == [SubscribeEvents(5, 0)]
    row = cdb.kind_model(Log).encode(Log("a", 1))
    for seq in (7, 8):
        sub.deliver(Event(5, seq, 2, Opcode.ASSERT, EventCause.CLIENT_WRITE, bytes(32), 0, row))
    assert sub.next_seq == 9
    sub.fail(cdb.ConnectionLost("reset"))
    again = FakeConnection()
    sub._resubscribe(as_connection(again))
    assert again.sent == [SubscribeEvents(5, 9)]
    sub.deliver(Error(ErrorCode.EVENTS_TRUNCATED, Opcode.SUBSCRIBE_EVENTS, "gone"))
    assert [item.seq for item in await drain(sub)] == [7, 8]
    with pytest.raises(cdb.EventsTruncated):
        await anext(sub)
    with pytest.raises(StopAsyncIteration):
        await anext(sub)
    assert sub.closed


async def test_a_refused_subscription_raises_its_typed_error() -> None:
    handle, _ = fake_handle()
    sub = handle.subscribe()
    task = asyncio.ensure_future(sub.start())
    await asyncio.sleep(0)
    sub.deliver(Error(ErrorCode.UNKNOWN_KIND, Opcode.SUBSCRIBE, "no such kind"))
    with pytest.raises(cdb.UnknownKind):
        await task
    assert sub.closed


async def test_ending_for_good_or_by_close() -> None:
    handle, _ = fake_handle()
    lost = handle.subscribe(bootstrap=False)
    await started(lost, 1)
    lost.deliver(state(1, 2))
    lost._end(cdb.ConnectionLost("gone for good"))
    assert (await anext(lost)).seq == 2  # what arrived is delivered first
    with pytest.raises(cdb.ConnectionLost, match="gone for good"):
        await anext(lost)
    closed = handle.subscribe(bootstrap=False)
    await started(closed, 1)
    closed.deliver(state(1, 2))
    closed._end(None)  # the client was closed: the iteration simply ends
    assert [item async for item in closed] == []


# --- against a server -------------------------------------------------------------------------


async def next_change(sub: Any) -> cdb.Change[Any]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            item = await anext(sub)
            if isinstance(item, cdb.Change):
                return item


async def test_bootstrap_then_typed_live_changes(server: ServerProcess) -> None:
    async with cdb.connect(*server.address, source_id=4) as client:
        items = await client.register_kind(Item)
        for key in range(3):
            await items.assert_(key, Item(f"i{key}", key, [key]))
        await client.sync()
        async with items.subscribe(include_previous=True) as sub:
            async with asyncio.timeout(TIMEOUT):
                begin = await anext(sub)
                bootstrap = [await anext(sub) for _ in range(3)]
                end = await anext(sub)
            assert begin == cdb.BootstrapStarted(BootstrapMode.FULL, 3, False)
            assert end == cdb.BootstrapComplete(BootstrapMode.FULL, 3)
            assert sorted(cdb.id_to_int(c.entity_id) for c in bootstrap) == [0, 1, 2]
            for change in bootstrap:
                key = cdb.id_to_int(change.entity_id)
                assert change.type is cdb.ChangeType.BOOTSTRAP
                assert change.value == Item(f"i{key}", key, [key])
                assert (change.version, change.source_set) == (1, 1 << 4)
                assert change.changed_fields == ALL_FIELDS and change.meta == b""
                assert change.changed_field_names == ("name", "hp", "tags")
                assert change.seq <= sub.accepted_seq

            meta = cdb.encode_metadata({"actor": "p1", "action": "create"})
            await items.assert_(10, Item("ten", 10), meta=meta)
            created = await next_change(sub)
            assert created.type is cdb.ChangeType.CREATED
            assert cdb.id_to_int(created.entity_id) == 10
            assert created.value == Item("ten", 10) and created.previous is None
            assert (created.version, created.source_set, created.sources) == (1, 16, [4])
            assert created.changed_fields == ALL_FIELDS
            assert created.metadata() == {"actor": "p1", "action": "create"}
            assert created.seq > sub.accepted_seq

            await items.patch(10, hp=11, meta=cdb.encode_metadata({"action": "heal"}))
            updated = await next_change(sub)
            assert updated.type is cdb.ChangeType.UPDATED
            assert updated.value == Item("ten", 11) and updated.previous == Item("ten", 10)
            assert updated.version == 2 and updated.changed_fields == 0b010
            assert updated.changed_field_names == ("hp",)
            assert updated.metadata() == {"action": "heal"}
            assert updated.seq > created.seq

            await items.retract(10, meta=b"raw bytes")
            deleted = await next_change(sub)
            assert deleted.type is cdb.ChangeType.DELETED and deleted.deleted
            assert deleted.value is None and deleted.previous == Item("ten", 11)
            assert deleted.version == 3 and deleted.source_set == 0
            assert deleted.cause is DeleteCause.RETRACTED and deleted.meta == b"raw bytes"
            with pytest.raises(cdb.MetadataError):
                deleted.metadata()
            assert sub.seq == deleted.seq


async def test_closing_unsubscribes(server: ServerProcess) -> None:
    async with cdb.connect(*server.address) as client:
        items = await client.register_kind(Item)
        async with items.subscribe(bootstrap=False) as sub:
            assert sub.subscription_id != 0 and client.connection.in_flight == 1
            await items.assert_(1, Item("one"))
            assert (await next_change(sub)).type is cdb.ChangeType.CREATED
        assert sub.closed and client.connection.in_flight == 0
        with pytest.raises(StopAsyncIteration):
            await anext(sub)

        async for item in items.subscribe():  # a plain loop: closed when left
            assert isinstance(item, cdb.BootstrapStarted)
            break
        await eventually(lambda: client.connection.in_flight == 0, "the loop unsubscribed")

        # still subscribed elsewhere: a fresh subscription sees the next change
        async with items.subscribe(bootstrap=False) as again:
            await items.patch(1, hp=2)
            assert (await next_change(again)).value == Item("one", 2)


async def catch_up(
    client: cdb.Client, sub: Any, mirror: cdb.Mirror[Any], seq: int, seen: list[Any] | None = None
) -> None:
    """Feed `mirror` from `sub` until it reflects flush `seq` whole: past the flush and any
    bootstrap, then everything the server sent before answering a PING (the rest of the flush).
    """
    seen = [] if seen is None else seen
    async with asyncio.timeout(TIMEOUT):
        while not (mirror.ready and not mirror.bootstrapping and mirror.seq >= seq):
            seen.append(await anext(sub))
            mirror.apply(seen[-1])
        await client.ping()
        for _ in range(sub.pending):
            seen.append(await anext(sub))
            mirror.apply(seen[-1])


async def test_a_slow_consumer_pauses_the_socket_and_then_converges(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, "--window-ms", "2") as server,
        cdb.connect(*server.address) as writer,
        cdb.connect(*server.address, read_only=True) as reader,
    ):
        items = await writer.register_kind(Item)
        reading = await reader.resolve_kind(Item)
        sub = reading.subscribe(bootstrap=False, max_queue=50)
        await sub.start()
        mirror = cdb.Mirror(reading)
        mirror.apply(cdb.BootstrapComplete(BootstrapMode.DELTA, 0))  # nothing to bootstrap
        name = "n" * 200
        writes = 0
        for round_ in range(60):
            async with writer.batch() as batch:
                for key in range(50):
                    batch.patch(items, key, name=name, hp=round_)
                    writes += 1
            await writer.sync()
        await eventually(lambda: reader.connection.reading_paused, "reading pauses")
        assert sub.pending < 50 + 200  # the queue, plus what one socket read can hold
        last = await writer.sync()
        seen: list[Any] = []
        await catch_up(reader, sub, mirror, last, seen)
        assert not reader.connection.reading_paused
        await assert_mirror_matches_server(mirror, reading, range(50))
        assert all(entry.value.hp == 59 for entry in mirror.entries().values())
        assert len(seen) <= writes
        await sub.close()


async def test_a_subscriber_dropped_as_slow_is_resubscribed(tmp_path: Path) -> None:
    back = Reconnections()
    async with (
        running_server(tmp_path, "--subscriber-timeout", "0.5", "--window-ms", "2") as server,
        cdb.connect(*server.address) as writer,
        # a client that holds its reading (a full queue) notices a reset connection when its
        # next heartbeat fails to be written: a short interval keeps the test short
        cdb.connect(
            *server.address,
            read_only=True,
            on_reconnect=back,
            liveness_deadline_ms=2000,
            heartbeat_interval_ms=250,
        ) as reader,
    ):
        items = await writer.register_kind(Item)
        reading = await reader.resolve_kind(Item)
        async with reading.subscribe(max_queue=20) as sub:
            mirror = cdb.Mirror(reading)
            name = "s" * 200
            round_ = 0
            async with asyncio.timeout(TIMEOUT):
                while back.count == 0:  # write, not reading, until the server drops the reader
                    async with writer.batch() as batch:
                        for key in range(500):
                            batch.patch(items, key, name=name, hp=round_)
                    last = await writer.sync()
                    round_ += 1
            # (the SLOW_SUBSCRIBER frame itself is usually never read: the reader was not
            # reading, and the server finally resets the connection)
            await catch_up(reader, sub, mirror, last)
            assert sub.resubscriptions >= 1
            await assert_mirror_matches_server(mirror, reading, range(500))


async def test_resume_receives_only_what_changed(server: ServerProcess, proxy: Proxy) -> None:
    keys = 10_000
    back = Reconnections()
    async with (
        cdb.connect(*server.address) as writer,
        cdb.connect(*proxy.address, read_only=True, on_reconnect=back) as reader,
    ):
        items = await writer.register_kind(Item)
        async with writer.batch() as batch:
            for key in range(keys):
                batch.assert_(items, key, Item(f"i{key}", key))
        loaded = await writer.sync()
        reading = await reader.resolve_kind(Item)
        mirror = cdb.Mirror(reading)
        async with reading.subscribe() as sub:
            await catch_up(reader, sub, mirror, loaded)
            assert len(mirror) == keys
            resume_from = sub.resume_seq
            proxy.refuse()
            proxy.cut()
            await eventually(lambda: reader.reconnecting, "the reader notices the cut")
            async with writer.batch() as batch:  # 1% of the entities change while it is away
                for key in range(0, keys, 100):
                    batch.patch(items, key, hp=key + 1)
                batch.retract(items, 1)
            last = await writer.sync()
            proxy.accept()
            await back.wait()
            after: list[Any] = []
            await catch_up(reader, sub, mirror, last, after)
            assert after[0] == cdb.Resubscribed(cdb.ReconnectMode.RESUME, resume_from)
            assert after[1].mode is BootstrapMode.DELTA
            changes = [item for item in after if isinstance(item, cdb.Change)]
            assert 101 <= len(changes) <= 150, len(changes)  # about 1%, not 10,000
            await assert_mirror_matches_server(mirror, reading, range(keys))


async def test_live_only_resumes_live_notifications(server: ServerProcess, proxy: Proxy) -> None:
    back = Reconnections()
    async with (
        cdb.connect(*server.address) as writer,
        cdb.connect(*proxy.address, read_only=True, on_reconnect=back) as reader,
    ):
        items = await writer.register_kind(Item)
        reading = await reader.resolve_kind(Item)
        async with reading.subscribe(bootstrap=False, mode=cdb.ReconnectMode.LIVE_ONLY) as sub:
            await items.assert_(1, Item("before"))
            assert (await next_change(sub)).value == Item("before")
            proxy.refuse()
            proxy.cut()
            await eventually(lambda: reader.reconnecting, "the reader notices the cut")
            await items.assert_(2, Item("missed"))
            await writer.sync()
            proxy.accept()
            await back.wait()
            async with asyncio.timeout(TIMEOUT):
                marker = await anext(sub)  # the subscription was sent again
            assert marker == cdb.Resubscribed(cdb.ReconnectMode.LIVE_ONLY, 0)
            await reader.sync()  # answered in order: the server has the subscription again
            await items.assert_(3, Item("after"))
            change = await next_change(sub)
            assert change.type is cdb.ChangeType.CREATED and change.value == Item("after")


async def test_events_carry_each_write_and_its_metadata(server: ServerProcess) -> None:
    async with cdb.connect(*server.address, source_id=6) as client:
        logs = await client.register_kind(Log)
        async with (
            logs.subscribe_events() as events,
            logs.subscribe(bootstrap=False) as changes,
        ):
            async with client.batch() as batch:  # one flush: coalesced away in the state view
                batch.assert_(logs, 1, Log("a", 1), meta=cdb.encode_metadata({"op": "assert"}))
                batch.patch(logs, 1, hp=5, meta=cdb.encode_metadata({"op": "patch"}))
                batch.retract(logs, 1, meta=cdb.encode_metadata({"op": "retract"}))
            await client.sync()
            await logs.assert_(2, Log("marker", 2), meta=b"m")
            async with asyncio.timeout(TIMEOUT):
                received = [await anext(events) for _ in range(4)]
            first, patched, retracted, marker = received
            assert [e.op for e in received] == [
                cdb.EventOp.ASSERT,
                cdb.EventOp.PATCH,
                cdb.EventOp.RETRACT,
                cdb.EventOp.ASSERT,
            ]
            assert [e.seq for e in received] == list(range(first.seq, first.seq + 4))
            assert {e.source_id for e in received} == {6}
            assert {e.cause for e in received} == {EventCause.CLIENT_WRITE}
            assert first.data == Log("a", 1) and first.value == Log("a", 1)
            assert first.metadata() == {"op": "assert"}
            assert patched.data == {"hp": 5} and patched.fields == {"hp": 5}
            assert patched.mask == 0b10 and patched.value is None
            assert patched.metadata() == {"op": "patch"}
            assert retracted.data is None and retracted.metadata() == {"op": "retract"}
            assert marker.meta == b"m" and cdb.id_to_int(marker.entity_id) == 2
            # the state view saw only the marker: assert + patch + retract netted to nothing
            change = await next_change(changes)
            assert cdb.id_to_int(change.entity_id) == 2 and change.meta == b"m"

        async with logs.subscribe_events(from_seq=first.seq + 1) as resumed:
            async with asyncio.timeout(TIMEOUT):
                again = [await anext(resumed) for _ in range(3)]
            assert again == received[1:]


async def test_events_too_old_and_kinds_without_events(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, "--event-ring", "8") as server,
        cdb.connect(*server.address) as client,
    ):
        logs = await client.register_kind(Log)
        items = await client.register_kind(Item)
        for number in range(20):
            await logs.assert_(1, Log("x", number))
        await client.sync()
        with pytest.raises(cdb.EventsTruncated):
            async with logs.subscribe_events(from_seq=1):
                pass
        with pytest.raises(cdb.NotEventStream):
            async for _ in items.subscribe_events():
                pass
        async with logs.subscribe_events(from_seq=15) as recent:
            async with asyncio.timeout(TIMEOUT):
                assert (await anext(recent)).seq == 15
        assert client.connection.in_flight == 0
