"""The SDK subscriber's CPU per change: frame -> message -> Change -> typed value -> Mirror.

What a `Mirror` subscriber spends on each notification, without the network: pre-encoded STATE
frames (live UPDATED changes of the 10-field bench kind, each with an 8-byte metadata tail, as
in bench/compare_redis.py) are fed in 64 KiB chunks to the SDK's own parsing code the way the
client connection does it (`FrameReader.feed`, the server-message class's `decode`,
`Subscription.deliver`). "Whole path, the Mirror's task" runs a started `Mirror` on an event
loop (a stub stands for the client and its connection), whose task takes the `Change` items
from its subscription with `async for` and applies them; "items taken by hand" does the same
without the event loop. The parts are also timed alone: splitting frames, decoding the
message, checking and decoding the row, building the typed object, `KindHandle.decode`.

Each figure is the median of several runs over the same frames (min..max after it), in CPU
microseconds (of this process) per change; the machine is shared, so figures are noisy. For
reference, on the 2-core development machine the Mirror's task took 32-44 µs per change before
the row decoder, `from_values` and the notification decoding were generated or streamlined,
and 13-17 µs after (about 3x fewer instructions: 176k -> 58k per change, by valgrind).

    python bench/sdk_decode.py [--frames N] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import convergedb as cdb
from _common import PLAYER, Player, player_row, spread
from convergedb.client.handle import KindHandle
from convergedb.client.subscription import Subscription
from convergedb.protocol import FrameReader, encode_message
from convergedb.protocol.codes import ChangeType
from convergedb.protocol.messages import SERVER_MESSAGES, Ok, State

ENTITIES = 10_000
CHUNK = 64 * 1024
META = (123_456_789).to_bytes(8, "little")


def make_frames(count: int) -> tuple[bytes, list[bytes]]:
    """`count` STATE frames (entity k mod ENTITIES, versions rising), joined; and their rows."""
    frames = []
    rows = []
    for k in range(count):
        i = k % ENTITIES
        version = k // ENTITIES + 2
        row = player_row(i, version)
        rows.append(row)
        state = State(
            1,
            cdb.id_from_int(i),
            ChangeType.UPDATED,
            version,
            1 << (i % 4),
            0b1000000100,
            k // 100 + 1,
            row,
            b"",
            META,
        )
        frames.append(encode_message(state, 1))
    return b"".join(frames), rows


class StubConnection:
    """What a subscription needs of its connection, without a socket: the frames are fed to
    the subscription (`sink`) by the benchmark, as `Connection.data_received` would."""

    is_lost = False

    def __init__(self) -> None:
        self.sink: Any = None

    def open_subscription(self, message: object, sink: Any) -> int:
        self.sink = sink
        return 1

    @contextlib.contextmanager
    def expecting_reply(self) -> Iterator[None]:
        yield

    def hold_reading(self, owner: object) -> None:
        raise AssertionError("the queue never fills up here")

    def release_reading(self, owner: object) -> None:
        pass

    def release_stream(self, stream_id: int) -> None:
        pass


class StubClient:
    """What a handle and its subscriptions need of a client."""

    def __init__(self) -> None:
        self.connection = StubConnection()

    def _attach_subscription(self, subscription: object) -> StubConnection:
        return self.connection

    def _detach_subscription(self, subscription: object) -> None:
        pass

    def _will_reconnect(self) -> bool:
        return False


def make_handle(client: object = None) -> KindHandle[Player]:
    """A handle of the bench kind, as `Client.resolve_kind` makes it."""
    return KindHandle(cast(Any, client or StubClient()), PLAYER, 1, 1, PLAYER.definition)


def timed(runs: int, count: int, body: Callable[[], object]) -> list[float]:
    """CPU microseconds per item of each run of `body` (which handles `count` items): CPU
    time of this process, so that other work on the machine inflates the figures less."""
    figures = []
    for _ in range(runs):
        started = time.process_time()
        body()
        figures.append((time.process_time() - started) * 1e6 / count)
    return figures


def report(label: str, figures: list[float]) -> None:
    median, low, high = spread(figures)
    print(f"{label:<46} {median:7.2f} µs/change   ({low:.2f}..{high:.2f}, {len(figures)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    count, runs = args.frames, args.runs
    stream, rows = make_frames(count)
    chunks = [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)]
    handle = make_handle()
    codec = handle.model.codec
    model = PLAYER
    # the chunks cut frames: split them with one reader, as a connection does
    reader = FrameReader()
    frames = [frame for chunk in chunks for frame in reader.feed(chunk)]
    payloads = [frame.payload for frame in frames]
    assert len(payloads) == count
    decoded = [codec.decode(row) for row in rows]

    def split() -> None:
        reader = FrameReader()
        for chunk in chunks:
            reader.feed(chunk)

    def decode_messages() -> None:
        decode = SERVER_MESSAGES[State.OPCODE].decode
        for payload in payloads:
            decode(payload)

    def check_rows() -> None:
        is_valid = codec.is_valid
        for row in rows:
            is_valid(row)

    def decode_rows() -> None:
        decode = codec.decode
        for row in rows:
            decode(row)

    def build_objects() -> None:
        from_values = model.from_values
        for values in decoded:
            from_values(values)

    def handle_decode() -> None:
        decode = handle.decode
        for row in rows:
            decode(row)

    mirrors: list[cdb.Mirror[Player]] = []

    def mirror_path() -> None:
        """The path without the event loop: the items are taken from the queue by hand."""
        subscription = Subscription(
            handle,
            bootstrap=True,
            include_previous=False,
            mode=cdb.ReconnectMode.RESUME,
            reconnect=False,
            max_queue=1 << 30,
        )
        mirror = cdb.Mirror(handle)
        mirrors.append(mirror)
        reader = FrameReader()
        classes = SERVER_MESSAGES
        deliver = subscription.deliver
        take = subscription._take
        to_item = subscription._to_item
        apply = mirror.apply
        for chunk in chunks:
            for frame in reader.feed(chunk):  # what Connection.data_received / _dispatch do
                deliver(classes[frame.opcode].decode(frame.payload))
            while subscription.pending:
                apply(to_item(take()))

    async def mirror_task() -> None:
        """The real thing: a started `Mirror`, whose task takes the items from its
        subscription with `async for`, while this coroutine feeds the frames chunk by chunk
        (each chunk's frames in one go, as `data_received` does, then the loop turns)."""
        client = StubClient()
        mirror = cdb.Mirror(make_handle(client), max_queue=1 << 30)
        mirrors.append(mirror)
        starting = asyncio.ensure_future(mirror.start())
        while client.connection.sink is None:
            await asyncio.sleep(0)
        sink = client.connection.sink
        sink.deliver(Ok(0))
        await starting
        reader = FrameReader()
        classes = SERVER_MESSAGES
        deliver = sink.deliver
        for chunk in chunks:
            for frame in reader.feed(chunk):
                deliver(classes[frame.opcode].decode(frame.payload))
            await asyncio.sleep(0)
        while sink.pending:
            await asyncio.sleep(0)
        client.connection.is_lost = True  # no UNSUBSCRIBE to send
        await mirror.close()

    print(
        f"{count:,} STATE frames of the 10-field bench kind, {len(stream) / count:.0f} bytes each"
    )
    report("split frames (FrameReader.feed)", timed(runs, count, split))
    report("decode message (State.decode)", timed(runs, count, decode_messages))
    report("check row (RowCodec.is_valid)", timed(runs, count, check_rows))
    report("decode row (RowCodec.decode)", timed(runs, count, decode_rows))
    report("typed object (KindModel.from_values)", timed(runs, count, build_objects))
    report("KindHandle.decode (check + decode + object)", timed(runs, count, handle_decode))
    report("whole path, items taken by hand", timed(runs, count, mirror_path))
    report(
        "whole path, the Mirror's task (asyncio)",
        timed(runs, count, lambda: asyncio.run(mirror_task())),
    )
    expected = model.from_values(codec.decode(rows[-1]))
    for mirror in mirrors:
        assert len(mirror) == min(count, ENTITIES), len(mirror)
        assert mirror.get((count - 1) % ENTITIES) == expected


if __name__ == "__main__":
    main()
