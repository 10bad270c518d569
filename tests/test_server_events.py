"""Event streams over real TCP against a real server (SPEC §8, §11; docs/protocol.md).

One event per ASSERT / PATCH / RETRACT on an event-stream kind, recorded before coalescing, with
per-kind contiguous sequence numbers; a bounded ring per kind; SUBSCRIBE_EVENTS from a sequence
still in the ring, else EVENTS_TRUNCATED.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    Batch,
    ConnectMode,
    Error,
    ErrorCode,
    Event,
    EventCause,
    Message,
    Ok,
    Opcode,
    Patch,
    Retract,
    State,
    SubscribeEvents,
    Unsubscribe,
)
from kinds import PLAYER, Player
from server_fixture import ServerProcess, running_server
from test_server_subscriptions import (
    BLOB,
    GatedClient,
    Mirror,
    blob,
    follow,
    player,
    reader_client,
    register,
    subscribe,
    writer_client,
)
from wire_client import WireClient

PLAYER_EVENTS = replace(PLAYER.definition, name="player_events", event_stream=True)
BLOB_EVENTS = replace(BLOB.definition, name="blob_events", event_stream=True)


async def subscribe_events(client: WireClient, kind: int, from_seq: int) -> tuple[int, Message]:
    """SUBSCRIBE_EVENTS; (subscription id, the reply)."""
    sub_id = client.next_stream()
    client.send(SubscribeEvents(kind, from_seq), sub_id)
    _, reply = await client.reply(sub_id)
    return sub_id, reply


async def next_events(client: WireClient, sub_id: int, count: int) -> list[Event]:
    events = []
    for _ in range(count):
        _, message = await client.reply(sub_id)
        assert isinstance(message, Event), message
        events.append(message)
    return events


def truncated(reply: Message) -> bool:
    return isinstance(reply, Error) and reply.code == ErrorCode.EVENTS_TRUNCATED


async def test_every_operation_is_an_event_in_order_with_its_own_metadata(
    server: ServerProcess,
) -> None:
    a, b = await writer_client(server, 1), await writer_client(server, 2)
    kind = await register(a, PLAYER_EVENTS)
    reader = await reader_client(server)
    events_id, reply = await subscribe_events(reader, kind, 0)
    assert reply == Ok(1)  # the first event this subscription will get
    states = Mirror(keep=True)
    state_id = await subscribe(reader, kind, mirror=states)

    e1, e2 = id_from_int(1), id_from_int(2)
    row1, row2 = PLAYER.encode(Player(name="a", hp=1)), PLAYER.encode(Player(name="b", hp=2))
    mask, values = PLAYER.patch({"hp": 7})
    operations: list[Assert | Patch | Retract] = [
        Assert(kind, e1, row1, b"m1"),
        Patch(kind, e1, mask, values, b"m2"),
        Retract(kind, e1, b"m3"),
        Assert(kind, e1, row2, b"m4"),
        Retract(kind, e2, b"m5"),  # changes nothing: still recorded
        Assert(kind, e1, row2, b"m6"),  # identical bytes: still recorded
    ]
    a.send(Batch(tuple(operations)))  # one flush: the state view coalesces them
    seq = await a.sync()
    b.send(Patch(kind, e1, mask, values, b"m7"))
    await b.sync()

    got = await next_events(reader, events_id, 7)
    assert got == [
        Event(kind, 1, 1, Opcode.ASSERT, EventCause.CLIENT_WRITE, e1, 0, row1, b"m1"),
        Event(kind, 2, 1, Opcode.PATCH, EventCause.CLIENT_WRITE, e1, mask, values, b"m2"),
        Event(kind, 3, 1, Opcode.RETRACT, EventCause.CLIENT_WRITE, e1, 0, b"", b"m3"),
        Event(kind, 4, 1, Opcode.ASSERT, EventCause.CLIENT_WRITE, e1, 0, row2, b"m4"),
        Event(kind, 5, 1, Opcode.RETRACT, EventCause.CLIENT_WRITE, e2, 0, b"", b"m5"),
        Event(kind, 6, 1, Opcode.ASSERT, EventCause.CLIENT_WRITE, e1, 0, row2, b"m6"),
        Event(kind, 7, 2, Opcode.PATCH, EventCause.CLIENT_WRITE, e1, mask, values, b"m7"),
    ]
    await follow(reader, state_id, states, lambda: states.live_frames == 2)
    created = states.messages[1]
    assert isinstance(created, State) and (created.seq, created.version) == (seq, 1)
    assert (created.data, created.meta) == (row2, b"m6")  # one net change, the last meta


async def test_resume_from_a_sequence_then_live_and_unsubscribe(server: ServerProcess) -> None:
    writer = await writer_client(server, 1)
    kind = await register(writer, PLAYER_EVENTS)
    writer.send(Batch(tuple(Assert(kind, id_from_int(i), player(i)) for i in range(10))))
    await writer.sync()
    reader = await reader_client(server)

    from_four, reply = await subscribe_events(reader, kind, 4)
    assert reply == Ok(4)
    assert [event.seq for event in await next_events(reader, from_four, 7)] == list(range(4, 11))
    from_next, reply = await subscribe_events(reader, kind, 11)  # exactly the next one
    assert reply == Ok(11)
    _, reply = await subscribe_events(reader, kind, 12)  # beyond the last event
    assert truncated(reply), reply

    writer.send(Assert(kind, id_from_int(42), player(42), b"live"))
    await writer.sync()
    for sub_id in (from_four, from_next):
        (event,) = await next_events(reader, sub_id, 1)
        assert (event.seq, event.eid, event.meta) == (11, id_from_int(42), b"live")

    assert await reader.request(Unsubscribe(from_four)) == Ok(0)
    writer.send(Retract(kind, id_from_int(42)))
    await writer.sync()
    assert [event.seq for event in await next_events(reader, from_next, 1)] == [12]
    assert reader._replies[from_four].empty()  # it would have come in the same write
    reply = await reader.request(Unsubscribe(from_four))
    assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_SUBSCRIPTION


async def test_the_ring_is_bounded_and_starts_empty_after_a_restart(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--event-ring", "8") as server:
        writer = await writer_client(server, 1)
        kind = await register(writer, PLAYER_EVENTS)
        plain = await register(writer, PLAYER.definition)
        writer.send(Batch(tuple(Assert(kind, id_from_int(i), player(i)) for i in range(20))))
        await writer.sync()
        reader = await reader_client(server)
        for too_old in (1, 12):
            _, reply = await subscribe_events(reader, kind, too_old)
            assert truncated(reply) and reply.op == Opcode.SUBSCRIBE_EVENTS, reply
        oldest, reply = await subscribe_events(reader, kind, 13)  # the ring holds 13..20
        assert reply == Ok(13)
        assert [event.seq for event in await next_events(reader, oldest, 8)] == list(range(13, 21))
        _, reply = await subscribe_events(reader, kind, 0)
        assert reply == Ok(21)
        _, reply = await subscribe_events(reader, plain, 0)
        assert isinstance(reply, Error) and reply.code == ErrorCode.NOT_EVENT_STREAM, reply
        _, reply = await subscribe_events(reader, 999, 0)
        assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_KIND, reply

        await server.restart()
        writer = await writer_client(server, 1)
        reader = await reader_client(server)
        _, reply = await subscribe_events(reader, kind, 20)  # the ring starts empty
        assert truncated(reply), reply
        resumed, reply = await subscribe_events(reader, kind, 21)  # the numbers go on
        assert reply == Ok(21)
        writer.send(Retract(kind, id_from_int(3), b"after"))
        await writer.sync()
        (event,) = await next_events(reader, resumed, 1)
        assert (event.seq, event.op, event.meta) == (21, Opcode.RETRACT, b"after")


async def test_an_event_subscriber_that_falls_out_of_the_ring_is_told_and_stays_connected(
    tmp_path: Path,
) -> None:
    """Events cannot be merged: a subscriber that backs up falls behind in the shared ring; when
    the ring has overwritten what it did not receive, its subscription ends with
    EVENTS_TRUNCATED on its own stream. The connection stays open."""
    args = ("--event-ring", "64", "--subscriber-buffer", "16", "--no-fsync")
    async with running_server(tmp_path, *args) as server:
        writer = await writer_client(server, 1)
        kind = await register(writer, BLOB_EVENTS)
        slow = await GatedClient.open_small(server.host, server.port)
        await slow.connect(ConnectMode.READ_ONLY)
        sub_id, reply = await subscribe_events(slow, kind, 0)
        assert reply == Ok(1)
        slow.gate.clear()
        for round_ in range(50):  # 5,000 events of 2 KB: far more than the socket buffers hold
            ops = tuple(Assert(kind, id_from_int(i), blob(i, round_, 2000)) for i in range(100))
            writer.send(Batch(ops))
            await writer.sync()
        slow.gate.set()
        expected = 1
        while True:
            _, message = await slow.reply(sub_id)
            if isinstance(message, Error):
                break
            assert isinstance(message, Event) and message.seq == expected, message
            expected += 1
        assert message.code == ErrorCode.EVENTS_TRUNCATED, message
        assert 1 < expected < 5000 - 64
        await slow.sync()  # still connected
        _, reply = await subscribe_events(slow, kind, 0)
        assert reply == Ok(5001)
        await slow.close()
