"""Network faults between the SDK and a real server (tests/faultproxy.py in between): delays,
stalls, resets, plain closes, half-closes and one-sided cuts.

- Writers ride them out: they reconnect (taking their source back) well within their liveness
  deadline, so nothing they assert is ever retracted for liveness, and after each reconnection
  they re-assert their state in an epoch (SPEC §7), the documented way to restore writes a lost
  connection dropped. Each ends exactly as it meant to (QUERY).
- Subscribers through the same faults: a FULL and a RESUME mirror end equal to the server
  (version and value of every entity), and no subscriber ever sees a value that no writer wrote
  for that entity.
- The run is recorded as a history (tests/history.py): every write each writer sent, with the
  seq of the SYNC that confirmed it (writes the SDK reports lost stay unconfirmed), every item
  of a FULL, a RESUME and a LIVE_ONLY subscription through the faults and of one on a direct
  link, and the final QUERYs; the history keeps the watch guarantees (ordered, atomic,
  reliable, resumable), so a LIVE_ONLY subscription never sees an entity's version go back or
  repeat, and the others end equal to the server.
- A link that goes silent for longer than the deadline: the server retracts the writer's
  entities no earlier than the deadline and no later than deadline + window + 1 s (SPEC §3), in
  one flush; when the link comes back the writer reconnects and re-creates them.

Two SDK defects the faults exposed are pinned by tests at the end: `sync()` after a
reconnection raises `WritesLost` rather than vouch for writes the lost connection dropped, and a
link dropped on the server's side only is noticed (heartbeats ask for a PONG) and re-established.
Sizes grow with CONVERGEDB_TORTURE=long (tests/torture_mode.py); CONVERGEDB_NETFAULT_SEED replays
a chaos run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pytest

import convergedb as cdb
from convergedb import ReconnectMode
from convergedb.protocol.codes import DeleteCause
from faultproxy import Direction, FaultProxy, Side
from history import (
    History,
    Key,
    Op,
    State,
    StateCheck,
    Watcher,
    Write,
    alive_states,
    change,
    checked,
    converge,
    key,
    query,
    recorded,
)
from server_fixture import ServerProcess, running_server
from torture_mode import mode_name, sized

pytestmark = pytest.mark.torture

WRITERS = sized(3, 5)
ENTITIES = sized(30, 150)
ROUNDS = sized(16, 120)
ENTITY_BASE = 1_000_000
"""A writer's entities: index * ENTITY_BASE + n."""
KIND = "netfault_item"
UPDATED, CREATED, DELETED = cdb.ChangeType.UPDATED, cdb.ChangeType.CREATED, cdb.ChangeType.DELETED
DEADLINE_MS = 3000
"""Writers' liveness deadline: every outage the chaos test makes is far shorter."""
HEARTBEAT_MS = 250
TIMEOUT = 20.0
RECONNECT = {"reconnect_delay": 0.05, "reconnect_max_delay": 0.2, "connect_timeout": 2.0}


@cdb.kind(KIND)
class Item:
    owner: Annotated[int, cdb.U8(0)] = 0
    serial: Annotated[int, cdb.U64(1)] = 0
    label: Annotated[str, cdb.String(2, max_length=24)] = ""


def row(index: int, serial: int) -> Item:
    """What writer `index` writes with `serial`: everything follows from the two."""
    return Item(index + 1, serial, f"w{index}-{serial}")


@contextlib.asynccontextmanager
async def proxy_to(server: ServerProcess) -> AsyncIterator[FaultProxy]:
    """A fault proxy in front of `server`, closed on the way out."""
    instance = FaultProxy(*server.address)
    await instance.start()
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
async def proxy(server: ServerProcess) -> AsyncIterator[FaultProxy]:
    async with proxy_to(server) as instance:
        yield instance


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll a client-side condition (one that changes on its own) every 10 ms."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


# --- the proxy itself ----------------------------------------------------------------------


@dataclass
class Echo:
    """An echo server that remembers what it received and whether it saw end of stream."""

    received: bytearray = field(default_factory=bytearray)
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the client's side ended: end of stream, or a reset."""
    server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                self.received += data
                writer.write(data)
            self.eof.set()
            writer.write(b"bye")  # a half-closed client still hears this
            await writer.drain()
        except (ConnectionError, OSError):
            self.eof.set()
        writer.close()


@contextlib.asynccontextmanager
async def echo_link() -> AsyncIterator[
    tuple[Echo, FaultProxy, asyncio.StreamReader, asyncio.StreamWriter]
]:
    echo = Echo()
    proxy = FaultProxy(*await echo.start())
    await proxy.start()
    reader, writer = await asyncio.open_connection(*proxy.address)
    await proxy.wait_accepted(1)
    try:
        yield echo, proxy, reader, writer
    finally:
        writer.transport.abort()
        await proxy.close()
        assert echo.server is not None
        echo.server.close()


async def test_the_proxy_delays_and_stalls() -> None:
    async with echo_link() as (echo, proxy, reader, writer):
        proxy.set_delay(0.1)
        started = time.monotonic()
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        assert time.monotonic() - started >= 0.2  # 0.1 s each way
        proxy.set_delay(0)
        proxy.stall()
        writer.write(b"held")
        with pytest.raises(TimeoutError):  # nothing gets through a stall
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        assert echo.received == b"ping"
        proxy.resume()
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"


async def test_the_proxy_resets_and_closes() -> None:
    async with echo_link() as (echo, proxy, reader, _writer):
        assert proxy.cut(reset=True) == 1
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 5)
        await asyncio.wait_for(echo.eof.wait(), 5)  # the server's side ends too
    async with echo_link() as (echo, proxy, reader, _writer):
        proxy.cut(reset=False)
        assert await asyncio.wait_for(reader.read(10), 5) == b""
    async with echo_link() as (echo, proxy, reader, _writer):
        proxy.cut(side=Side.CLIENT)  # the server's side stays open: a half-open connection
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 5)
        assert not echo.eof.is_set()


async def test_the_proxy_half_closes() -> None:
    async with echo_link() as (echo, proxy, reader, writer):
        proxy.half_close(Direction.UP)  # the server reads EOF; what it says still arrives
        await asyncio.wait_for(echo.eof.wait(), 5)
        assert await asyncio.wait_for(reader.read(10), 5) == b"bye"
    async with echo_link() as (echo, proxy, reader, writer):
        proxy.half_close(Direction.DOWN)  # the client reads EOF; what it sends still arrives
        assert await asyncio.wait_for(reader.read(10), 5) == b""
        writer.write(b"late")
        await wait_for(lambda: echo.received == b"late", "the client's bytes still go up")


# --- writers and subscribers under chaos ---------------------------------------------------


class Writer:
    """One writer service: its own entities and the state it means them to have. Every write it
    sends goes into the history, confirmed by the SYNC that answers after it."""

    def __init__(self, index: int, rng: random.Random, history: History) -> None:
        self.index = index
        self.source_id = index + 1
        self.rng = rng
        self.history = history
        self.desired: dict[int, Item] = {}
        self.touched: set[int] = set()
        self.pending: list[Write] = []
        """Writes sent since the last SYNC answered."""
        self.serial = 0
        self.ops = 0
        self.recoveries = 0
        self.needs_recovery = False
        self.progress = asyncio.Event()
        self.client: cdb.Client | None = None
        self.items: cdb.KindHandle[Item] | None = None

    def entity(self, n: int) -> int:
        return self.index * ENTITY_BASE + n

    def _reconnected(self, _client: cdb.Client) -> None:
        # runs before the client's new connection carries anything else
        self.needs_recovery = True

    async def open(self, address: tuple[str, int]) -> None:
        self.client = await cdb.connect(
            *address,
            source_id=self.source_id,
            name=f"writer-{self.index}",
            liveness_deadline_ms=DEADLINE_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
            on_reconnect=self._reconnected,
            **RECONNECT,
        )
        self.items = await self.client.register_kind(Item)

    def value_for(self, entity: int, op: Op = Op.ASSERT) -> Item:
        """A new value for `entity`, recorded as a write about to be sent."""
        self.serial += 1
        self.record(entity, op, self.serial)
        return row(self.index, self.serial)

    def record(self, entity: int, op: Op, serial: int = 0) -> None:
        write = self.history.writes.record(self.source_id, key(KIND, entity), op, serial)
        self.pending.append(write)

    async def sync(self) -> int:
        """SYNC: every write sent since the last one is confirmed at the seq it answers."""
        assert self.client is not None
        seq = await self.client.sync()
        self.history.writes.confirm(self.pending, seq)
        self.pending = []
        return seq

    async def lost(self) -> None:
        """The SDK reported the connection lost: the writes no SYNC confirmed may never have
        reached the server (they stay unconfirmed). Recover once connected again."""
        assert self.client is not None
        self.pending = []
        await self.client.wait_connected(timeout=TIMEOUT)
        self.needs_recovery = True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if self.needs_recovery:
                    await self.recover()
                    continue
                await self.step()
                self.ops += 1
                self.progress.set()
                if self.ops % 8 == 0:
                    await self.sync()
            except (cdb.ConnectionLost, cdb.EpochNotOpen):
                await self.lost()

    async def step(self) -> None:
        assert self.items is not None
        entity = self.entity(self.rng.randrange(ENTITIES))
        self.touched.add(entity)
        roll = self.rng.random()
        if roll < 0.15 and entity in self.desired:
            del self.desired[entity]
            self.record(entity, Op.RETRACT)
            await self.items.retract(entity)
            return
        if roll < 0.5:
            value = self.desired[entity] = self.value_for(entity, Op.PATCH)
            await self.items.patch(
                entity, owner=value.owner, serial=value.serial, label=value.label
            )
        else:
            value = self.desired[entity] = self.value_for(entity)
            await self.items.assert_(entity, value)

    async def recover(self) -> None:
        """Re-assert the whole intended state in an epoch: writes a lost connection dropped are
        restored, and entities whose RETRACT it dropped are swept."""
        assert self.client is not None and self.items is not None
        self.needs_recovery = False
        async with self.client.epoch(), self.client.batch() as batch:
            for entity, value in self.desired.items():
                self.record(entity, Op.ASSERT, value.serial)
                batch.assert_(self.items, entity, value)
        await self.sync()
        self.recoveries += 1

    async def settle(self) -> int:
        """Recover until it sticks (the faults have stopped); the seq of the last flush."""
        while True:
            try:
                await self.recover()
                return await self.sync()
            except (cdb.ConnectionLost, cdb.EpochNotOpen):
                await self.lost()


def written_state(history: History) -> StateCheck:
    """Whether a state is a row that the entity's writer wrote to it (see `history.StateCheck`)."""

    def check(entity: Key, value: Item, _meta: bytes | None) -> str | None:
        index = cdb.id_to_int(entity[1]) // ENTITY_BASE
        if value != row(index, value.serial):
            return f"{value} is not a row writer {index + 1} writes"
        if value.serial not in history.writes.sent_values(entity, index + 1):
            return f"{value} was never written to this entity"
        return None

    return check


def serial_of(_entity: Key, value: Item, writer: int) -> int | None:
    """The serial `writer` last wrote into a state (see `history.Contribution`)."""
    return int(value.serial) if value.owner == writer else None


class Chaos:
    """Applies one fault to every open link of the proxy, for a short while."""

    KINDS = (
        "reset",
        "close",
        "half_close_up",
        "half_close_down",
        "client_side",
        "stall",
        "delay",
        "refuse",
    )

    def __init__(self, proxy: FaultProxy, rng: random.Random) -> None:
        self.proxy = proxy
        self.rng = rng
        self.applied: Counter[str] = Counter()

    def schedule(self, rounds: int) -> list[str]:
        kinds = list(self.KINDS) * (rounds // len(self.KINDS) + 1)
        first, rest = kinds[: len(self.KINDS)], kinds[len(self.KINDS) :]
        self.rng.shuffle(first)
        self.rng.shuffle(rest)
        return (first + rest)[:rounds]

    async def apply(self, kind: str) -> None:
        proxy, rng = self.proxy, self.rng
        proxy.set_delay(0)
        self.applied[kind] += 1
        if kind in ("reset", "close"):
            proxy.cut(reset=kind == "reset")
        elif kind == "half_close_up":
            proxy.half_close(Direction.UP)
        elif kind == "half_close_down":
            proxy.half_close(Direction.DOWN)
        elif kind == "client_side":
            proxy.cut(side=Side.CLIENT)
        elif kind == "stall":
            proxy.stall()
            await asyncio.sleep(rng.uniform(0.2, 0.8))  # the fault itself: a silent network
            proxy.resume()
        elif kind == "delay":
            proxy.set_delay(rng.uniform(0.02, 0.1))  # for the whole next round
        else:
            proxy.refuse_new = True
            proxy.cut(reset=True)
            await asyncio.sleep(rng.uniform(0.2, 0.5))  # the fault itself: the server is away
            proxy.refuse_new = False

    def heal(self) -> None:
        self.proxy.set_delay(0)
        self.proxy.resume()
        self.proxy.refuse_new = False


async def progress(writers: list[Writer], ops: int) -> None:
    """Wait until every writer has done `ops` more operations."""
    targets = [(w, w.ops + ops) for w in writers]
    async with asyncio.timeout(TIMEOUT):
        for writer, target in targets:
            while writer.ops < target:
                writer.progress.clear()
                await writer.progress.wait()


async def server_state(
    history: History, reader: cdb.Client, entities: set[int]
) -> dict[Key, State]:
    """Every alive entity among `entities`, read directly from the server (and recorded)."""
    return alive_states(KIND, await query(history, await reader.resolve_kind(Item), entities))


def mirrored(mirror: cdb.Mirror[Item]) -> dict[Key, State]:
    return {(KIND, eid): State(e.version, e.value) for eid, e in mirror.entries().items()}


@contextlib.asynccontextmanager
async def open_writers(
    writers: list[Writer], address: tuple[str, int]
) -> AsyncIterator[list[cdb.Client]]:
    """Connect every writer; close them all on the way out, whatever happened."""
    clients: list[cdb.Client] = []
    try:
        for writer in writers:
            await writer.open(address)
            assert writer.client is not None
            clients.append(writer.client)
        yield clients
    finally:
        for client in clients:
            await client.close()


@dataclass
class Recording:
    """Subscriptions that record every item into one history."""

    history: History
    watchers: list[Watcher] = field(default_factory=list)

    async def watch(
        self, name: str, handle: cdb.KindHandle[Item], mode: ReconnectMode, **options: bool
    ) -> None:
        """Subscribe to `handle`'s kind (`options`: `Watcher.start`'s) and record it."""
        watcher = Watcher(self.history.subscriber(name, handle.name, mode))
        await watcher.start(handle, **options)
        self.watchers.append(watcher)


@contextlib.asynccontextmanager
async def recording(history: History) -> AsyncIterator[Recording]:
    """A `Recording` whose subscriptions are closed on the way out."""
    recorder = Recording(history)
    try:
        yield recorder
    finally:
        for watcher in recorder.watchers:
            await watcher.close()


async def run_chaos(chaos: Chaos, writers: list[Writer], clients: list[cdb.Client]) -> None:
    """The writers write while each round of the schedule faults every link; after each
    fault, every client is connected again before the next round."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(w.run(stop)) for w in writers]
    for kind in chaos.schedule(ROUNDS):
        await progress(writers, 5)
        await chaos.apply(kind)
        for client in clients:
            await client.wait_connected(timeout=TIMEOUT)
    await progress(writers, 5)
    chaos.heal()
    stop.set()
    await asyncio.gather(*tasks)


async def check_writers(
    writers: list[Writer], history: History, observer: cdb.Client, seed: int
) -> None:
    """Once settled, each writer's entities are exactly what it means them to be."""
    for writer in writers:
        await writer.settle()
    state = await server_state(history, observer, set().union(*(w.touched for w in writers)))
    for writer in writers:
        for entity in writer.touched:
            expected = writer.desired.get(entity)
            found = state.get(key(KIND, entity))
            assert (found and found.value) == expected, (seed, entity, found, expected)


async def check_mirrors(
    mirrors: list[cdb.Mirror[Item]], writers: list[Writer], observer: cdb.Client, seed: int
) -> dict[Key, State]:
    """After a last change of the kind (a barrier), every mirror equals the server; the
    server's final state."""
    first = writers[0]
    assert first.items is not None
    marker = first.entity(ENTITIES)
    await first.items.assert_(marker, first.value_for(marker))
    final_seq = await first.sync()
    for mirror in mirrors:
        await mirror.wait_seq(final_seq, TIMEOUT)
    entities = {marker}.union(*(w.touched for w in writers))
    state = await server_state(first.history, observer, entities)
    for mirror in mirrors:
        assert mirrored(mirror) == state, (seed, mirror.mode)
    return state


async def test_writers_and_subscribers_ride_out_network_faults(tmp_path: Path) -> None:
    """Writers, mirrors and recorded subscriptions through every kind of fault; then each
    writer's entities, each mirror and the recorded history are checked."""
    seed = int(os.environ.get("CONVERGEDB_NETFAULT_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    history = History()
    writers = [Writer(i, random.Random(rng.random()), history) for i in range(WRITERS)]
    state_ok = written_state(history)
    strange: list[str] = []

    def check_value(where: str) -> Callable[[cdb.Change[Item]], None]:
        def check(change: cdb.Change[Item]) -> None:
            if change.value is not None and (
                complaint := state_ok((KIND, change.entity_id), change.value, None)
            ):
                strange.append(f"{where}: {complaint}")

        return check

    reader_options: dict[str, Any] = {
        "read_only": True,
        "liveness_deadline_ms": DEADLINE_MS,
        "heartbeat_interval_ms": HEARTBEAT_MS,
        **RECONNECT,
    }
    async with (
        # kept for a day: nothing is compacted, so every RESUME is answered with a delta
        running_server(tmp_path, "--tombstone-retention", "86400") as server,
        proxy_to(server) as proxy,
        open_writers(writers, proxy.address) as writer_clients,
        cdb.connect(*server.address, read_only=True) as observer,
        cdb.connect(*proxy.address, **reader_options) as full_reader,
        cdb.connect(*proxy.address, **reader_options) as resume_reader,
        recording(history) as recorder,
    ):
        chaos = Chaos(proxy, rng)
        full_items = await full_reader.resolve_kind(Item)
        resume_items = await resume_reader.resolve_kind(Item)
        full = cdb.Mirror(full_items, mode=ReconnectMode.FULL, on_change=check_value("full"))
        resume = cdb.Mirror(
            resume_items, mode=ReconnectMode.RESUME, on_change=check_value("resume")
        )
        # one on a direct link (never cut), and three through the faults
        observed = await observer.resolve_kind(Item)
        await recorder.watch("observer", observed, ReconnectMode.RESUME, bootstrap=False)
        await recorder.watch("full", full_items, ReconnectMode.FULL, include_previous=True)
        await recorder.watch("resume", resume_items, ReconnectMode.RESUME)
        await recorder.watch("live-only", full_items, ReconnectMode.LIVE_ONLY, bootstrap=False)
        async with full, resume:
            await full.wait_synced(TIMEOUT)
            await resume.wait_synced(TIMEOUT)
            await run_chaos(chaos, writers, [full_reader, resume_reader, *writer_clients])
            await check_writers(writers, history, observer, seed)
            final = await check_mirrors([full, resume], writers, observer, seed)
        await converge(recorder.watchers, final, TIMEOUT)
    report = history.check(final, state_ok=state_ok, contribution=serial_of, delta_resumes=True)
    assert not strange, (seed, strange[:10])
    try:
        report.assert_holds()
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from None
    causes = [f.cause for log in history.subscribers for f in log.frames]
    assert DeleteCause.LIVENESS not in causes, (seed, "an entity was retracted for liveness")
    reconnects = {f"writer-{i}": client.reconnects for i, client in enumerate(writer_clients)}
    reconnects |= {"full": full_reader.reconnects, "resume": resume_reader.reconnects}
    assert all(count >= 1 for count in reconnects.values()), reconnects
    sweeps = sum(1 for f in history.subscribers[0].frames if f.cause == DeleteCause.EPOCH_END)
    print(
        f"\nnetwork faults [{mode_name()}] (seed {seed}): {dict(chaos.applied)}; reconnections "
        f"{reconnects}; recoveries {sum(w.recoveries for w in writers)}, lost retracts swept "
        f"by epochs {sweeps}; {report.summary()}"
    )


def test_the_checks_count_a_live_deletion_that_interleaves_with_a_delta() -> None:
    """Seen under these faults: flush 6 goes live while a RESUME's delta is under way; its
    deletion looks like one of the delta's tombstones, and was received all the same."""
    history = History()
    created = (change(CREATED, 1, 1, 5), change(CREATED, 2, 1, 5))
    flush = (change(UPDATED, 1, 2, 6), change(DELETED, 2, 2, 6))
    recorded(history, "direct", *created, *flush)
    delta = cdb.BootstrapStarted(cdb.BootstrapMode.DELTA, 0, True)
    recorded(history, "resumed", *created, cdb.Resubscribed(ReconnectMode.RESUME, 5), delta,
             *flush, cdb.BootstrapComplete(cdb.BootstrapMode.DELTA, 0))  # fmt: skip
    checked(history, {key("k", 1): State(2, 1)}).assert_holds()


def test_only_a_live_only_subscription_that_reconnected_may_end_behind() -> None:
    history = History()
    recorded(history, "direct", change(CREATED, 1, 1, 5), change(CREATED, 2, 1, 6))
    cut = cdb.Resubscribed(ReconnectMode.LIVE_ONLY, 0)
    mode = ReconnectMode.LIVE_ONLY
    recorded(history, "reconnected", change(CREATED, 1, 1, 5), cut, mode=mode)
    recorded(history, "never-cut", change(CREATED, 1, 1, 5), mode=mode)
    report = checked(history, {key("k", 1): State(1, 1), key("k", 2): State(1, 1)})
    assert [v.split()[0] for v in report.reliable] == ["never-cut"], report.reliable


# --- a link silent past the deadline -------------------------------------------------------


async def test_a_link_silent_past_the_deadline_is_retracted_on_time_then_restored(
    server: ServerProcess, proxy: FaultProxy
) -> None:
    deadline_s = 1.0
    window_s = 0.02  # the server's default window
    keys = range(10)

    async def reassert(client: cdb.Client) -> None:
        items = await client.register_kind(Item)  # the same handle would do as well
        async with client.batch() as batch:
            for key in keys:
                batch.assert_(items, key, Item(1, key, "again"))

    async with (
        cdb.connect(
            *proxy.address,
            source_id=1,
            liveness_deadline_ms=int(deadline_s * 1000),
            heartbeat_interval_ms=200,
            on_reconnect=reassert,
            **RECONNECT,
        ) as writer,
        cdb.connect(*server.address, read_only=True) as observer,
    ):
        items = await writer.register_kind(Item)
        async with writer.batch() as batch:
            for key in keys:
                batch.assert_(items, key, Item(1, key, "first"))
        await writer.sync()
        watched = await observer.resolve_kind(Item)
        async with watched.subscribe(bootstrap=False) as changes:
            proxy.stall()  # the server hears nothing more from the writer
            link = proxy.open_links[0]
            deaths: list[tuple[float, cdb.Change[Item]]] = []
            async with asyncio.timeout(TIMEOUT):
                async for item in changes:
                    if isinstance(item, cdb.Change) and item.deleted:
                        deaths.append((time.monotonic(), item))
                        if len(deaths) == len(keys):
                            break
            silent_for = deaths[0][0] - link.up.last_forward
            assert silent_for >= deadline_s, silent_for  # never before the deadline
            assert silent_for <= deadline_s + window_s + 1.0 + 1.0, silent_for  # + observing
            assert {c.cause for _, c in deaths} == {DeleteCause.LIVENESS}
            assert len({c.seq for _, c in deaths}) == 1  # one flush
            assert {c.version for _, c in deaths} == {2}

            proxy.resume()  # the writer finds its connection closed, reconnects, re-asserts
            back: dict[int, cdb.Change[Item]] = {}
            async with asyncio.timeout(TIMEOUT):
                async for item in changes:
                    if isinstance(item, cdb.Change) and not item.deleted:
                        back[cdb.id_to_int(item.entity_id)] = item
                        if len(back) == len(keys):
                            break
        assert writer.reconnects >= 1
        assert all(c.type is cdb.ChangeType.CREATED and c.version == 3 for c in back.values())
        for key in keys:
            result = await watched.query(key)
            assert result.alive and result.value == Item(1, key, "again"), result


# --- SDK defects the faults expose -------------------------------------------------------------


async def test_sync_after_a_reconnection_does_not_vouch_for_lost_writes(
    server: ServerProcess, proxy: FaultProxy
) -> None:
    back = asyncio.Event()
    async with cdb.connect(
        *proxy.address, source_id=3, on_reconnect=lambda _c: back.set(), **RECONNECT
    ) as client:
        items = await client.register_kind(Item)
        await client.sync()
        proxy.stall(Direction.UP)
        await items.assert_(1, Item(3, 1, "in transit"))  # held by the proxy...
        proxy.cut(reset=True)  # ...and dropped with the connection
        proxy.resume(Direction.UP)
        await asyncio.wait_for(back.wait(), TIMEOUT)
        assert not (await items.query(1)).found  # the write is lost, as the spec allows
        with pytest.raises(cdb.ConnectionLost) as caught:  # but sync must not say it was flushed
            await client.sync()
        assert isinstance(caught.value, cdb.WritesLost) and caught.value.count == 1
        assert await client.sync() >= 1  # told once: the next sync is a plain barrier again
        await items.assert_(1, Item(3, 1, "again"))
        await client.sync()
        assert (await items.query(1)).alive


async def test_a_sync_waiting_when_the_connection_drops_reports_the_lost_writes(
    server: ServerProcess, proxy: FaultProxy
) -> None:
    async with cdb.connect(*proxy.address, source_id=5, **RECONNECT) as client:
        items = await client.register_kind(Item)
        await client.sync()
        proxy.stall(Direction.UP)
        await items.assert_(1, Item(5, 1, "in transit"))
        waiting = asyncio.ensure_future(client.sync())
        await wait_for(lambda: client.connection.in_flight == 1, "the SYNC is sent")
        proxy.cut(reset=True)
        proxy.resume(Direction.UP)
        with pytest.raises(cdb.WritesLost):
            await asyncio.wait_for(waiting, TIMEOUT)
        await client.wait_connected(timeout=TIMEOUT)
        assert await client.sync() >= 1  # reported by the sync that was waiting: once


async def test_an_epoch_after_a_reconnection_supersedes_the_lost_writes(
    server: ServerProcess, proxy: FaultProxy
) -> None:
    state = {1: Item(6, 1, "kept"), 2: Item(6, 2, "in transit")}
    restored = asyncio.Event()

    async def reassert(client: cdb.Client) -> None:
        items = await client.register_kind(Item)
        async with client.epoch(), client.batch() as batch:
            for key, value in state.items():
                batch.assert_(items, key, value)
        restored.set()

    async with cdb.connect(
        *proxy.address, source_id=6, on_reconnect=reassert, **RECONNECT
    ) as client:
        items = await client.register_kind(Item)
        await items.assert_(1, state[1])
        await client.sync()
        proxy.stall(Direction.UP)
        await items.assert_(2, state[2])
        proxy.cut(reset=True)
        proxy.resume(Direction.UP)
        await asyncio.wait_for(restored.wait(), TIMEOUT)
        await client.sync()  # the epoch re-asserted everything: nothing is missing
        for key, value in state.items():
            assert (await items.query(key)).value == value


async def test_a_writer_cut_off_on_the_servers_side_reconnects(
    server: ServerProcess, proxy: FaultProxy
) -> None:
    async with cdb.connect(
        *proxy.address,
        source_id=4,
        liveness_deadline_ms=1000,
        heartbeat_interval_ms=200,
        **RECONNECT,
    ) as client:
        items = await client.register_kind(Item)
        await items.assert_(1, Item(4, 1, "kept"))
        await client.sync()
        proxy.cut(side=Side.SERVER)  # the client's socket stays open, and hears nothing more
        await wait_for(lambda: client.reconnects >= 1, "the client reconnects", timeout=4.0)


async def test_a_sync_on_a_link_dead_on_the_servers_side_fails_and_nothing_is_retracted(
    server: ServerProcess, proxy: FaultProxy
) -> None:
    """The client notices the dead link within half its deadline, so it takes its source back
    before the server retracts anything; the SYNC it was waiting on fails instead of hanging."""
    async with (
        cdb.connect(
            *proxy.address,
            source_id=7,
            liveness_deadline_ms=2000,
            heartbeat_interval_ms=200,
            **RECONNECT,
        ) as client,
        cdb.connect(*server.address, read_only=True) as observer,
    ):
        items = await client.register_kind(Item)
        await items.assert_(1, Item(7, 1, "kept"))
        await client.sync()
        proxy.cut(side=Side.SERVER)
        await items.assert_(2, Item(7, 2, "into the void"))
        with pytest.raises(cdb.WritesLost):
            await asyncio.wait_for(client.sync(), TIMEOUT)
        await client.wait_connected(timeout=TIMEOUT)
        watched = await observer.resolve_kind(Item)
        result = await watched.query(1)
        assert result.alive and result.version == 1 and result.source_set == 1 << 7
        assert not (await watched.query(2)).found
