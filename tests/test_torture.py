"""Crash torture (SPEC §5, §9, §11): SIGKILL the server again and again under load, restart it
on the same data directory, and check that nothing confirmed was lost.

Each scenario runs a real server over real TCP on one data directory, with SDK writers that
confirm their writes with SYNC and SDK subscribers that reconnect after every restart (RESUME
and FULL). It kills the server with SIGKILL at a random moment — anywhere under mixed load,
while compaction runs, while an epoch end retracts many entities, and while a liveness expiry
retracts what a dead writer held — then starts it again and checks:

- the store opens cleanly (the server starts, logs no error, /health is ok);
- every write confirmed by SYNC before the kill is there (the row, and its source in the source
  set); writes sent but not confirmed are either all there or lost from some point on;
- no entity's version goes below one anyone observed before the kill;
- an epoch end or a liveness expiry is applied whole or not at all;
- the subscribers' recorded histories keep the watch guarantees (see `history.py`) and each
  subscriber ends equal to the server.

Two targeted races ride along with the compaction scenario: compaction against the flush that
re-creates an entity, and compaction against the counting pass of a RESUME (delta) bootstrap.
The tests at the end check that the history checks themselves catch what they should.

Sizes come from `torture_mode`: a fast default for `make test`, larger counts under
`CONVERGEDB_TORTURE=long` (`make torture`). `CONVERGEDB_TORTURE_SEED` replays a run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import aiohttp
import pytest

import convergedb as cdb
from convergedb import QueryStatus, ReconnectMode, id_from_int, id_to_int
from convergedb.protocol import (
    Assert,
    Batch,
    BootstrapBegin,
    BootstrapEnd,
    ConnectMode,
    CreateKind,
    Deleted,
    KindInfo,
    Ok,
    Retract,
    Subscribe,
    SubscribeFlags,
    Unsubscribe,
)
from history import (
    Found,
    History,
    Key,
    Op,
    State,
    Watcher,
    Write,
    alive_states,
    change,
    checked,
    converge,
    eventually,
    key,
    query,
    recorded,
)
from kinds import Player
from server_fixture import ServerProcess
from torture_mode import mode_name, sized
from wire_client import WireClient

pytestmark = pytest.mark.torture

TESTS = Path(__file__).parent
RECONNECT_TIMEOUT = 60.0
"""Seconds every client has to be connected again after a restart (a stalled machine)."""
CONVERGE_TIMEOUT = 60.0
"""Seconds subscribers have to reach the server's final state once the writes stopped."""
PROGRESS_TIMEOUT = 60.0
"""Seconds the writers have to confirm the rounds a kill waits for."""
OWN_BASE = 1_000_000
"""Entity ids of a writer's own entities: source * OWN_BASE + n. Shared ids are below it."""
BULK_SOURCE = 10
DYING_SOURCE = 20
HELPER_SOURCE = 21


@cdb.kind("torture_item")
class Item:
    owner: Annotated[int, cdb.U8(0)] = 0
    counter: Annotated[int, cdb.U64(1)] = 0
    note: Annotated[str, cdb.String(2, max_length=48)] = ""
    a: Annotated[int, cdb.U64(3)] = 0
    b: Annotated[int, cdb.U64(4)] = 0


@cdb.kind("torture_bulk")
class Bulk:
    owner: Annotated[int, cdb.U8(0)] = 0
    counter: Annotated[int, cdb.U64(1)] = 0


SHARED_SLOTS = {1: "a", 2: "b"}
"""The field each writer owns on the shared entities (field ownership, SPEC §4)."""


def own_row(writer: int, counter: int) -> Item:
    """The row a writer asserts on its own entities: everything follows from the counter."""
    return Item(writer, counter, f"w{writer}:" + "x" * (counter % 40))


def seed() -> int:
    """The random seed (printed, so that a failing run can be replayed)."""
    given = os.environ.get("CONVERGEDB_TORTURE_SEED")
    return int(given) if given else random.randrange(1 << 32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the rig: a server, its clients, the recorded history ------------------------------------


class Rig:
    """One server on one data directory, killed and restarted; its clients; the history."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.admin_port = free_port()
        self.server = ServerProcess(tmp_path, (*args, "--admin-port", str(self.admin_port)))
        self.history = History()
        self.kills = 0
        self.clients: list[cdb.Client] = []
        self.watchers: list[Watcher] = []
        self.checker: cdb.Client | None = None

    async def start(self) -> None:
        await self.server.start()
        await self.check_store_opened()
        self.checker = await self.connect(read_only=True, name="checker")

    async def connect(self, **options: Any) -> cdb.Client:
        """An SDK client that reconnects quickly (the server comes back within seconds)."""
        client = await cdb.connect(
            self.server.host,
            self.server.port,
            reconnect_delay=0.05,
            reconnect_max_delay=0.5,
            connect_timeout=30,
            **options,
        )
        self.clients.append(client)
        return client

    async def watch(
        self, name: str, cls: type[Any], mode: ReconnectMode, *, include_previous: bool = False
    ) -> Watcher:
        client = await self.connect(read_only=True, name=name)
        handle = await client.resolve_kind(cls)
        watcher = Watcher(self.history.subscriber(name, handle.name, mode))
        await watcher.start(handle, include_previous=include_previous)
        self.watchers.append(watcher)
        return watcher

    async def kill(self) -> None:
        """SIGKILL the server (a crash) and wait until it is gone."""
        status = await self.server.kill()
        assert status == -signal.SIGKILL, f"the server had already exited with {status}"
        self.kills += 1

    async def restart(self) -> None:
        """Start the server on the same data directory; wait until every client is back."""
        await self.server.start()
        await self.restart_clients()

    async def restart_clients(self) -> None:
        """After `server.start()`: check the store opened, wait until every client is back."""
        await self.check_store_opened()
        for client in self.clients:
            await client.wait_connected(RECONNECT_TIMEOUT)

    async def check_store_opened(self) -> None:
        """The server loaded the store with no error and reports itself healthy."""
        log = self.server.stderr_path.read_text(errors="replace")
        since_start = log.rsplit("=== start", 1)[-1]
        assert "loaded" in since_start, self.server.output_tail()
        assert_clean_log(since_start, self.server)
        status, body = await admin_get(self.admin_port, "/health")
        assert status == 200 and body["status"] == "ok", body

    async def query(self, handle: cdb.KindHandle[Any], ids: Iterable[int]) -> dict[int, Found]:
        """QUERY every id (concurrently), recording each result in the history."""
        return await query(self.history, handle, ids)

    async def converge(self, final: dict[Key, State]) -> None:
        """Wait until every watcher's view equals the server's final state."""
        await converge(self.watchers, final, CONVERGE_TIMEOUT)

    async def close(self) -> None:
        for watcher in self.watchers:
            await watcher.close()
        for client in self.clients:
            await client.close()
        if self.server.running:
            await self.server.stop()
        assert_clean_log(self.server.stderr_path.read_text(errors="replace"), self.server)


def assert_clean_log(text: str, server: ServerProcess) -> None:
    """No error, critical failure or traceback in the server's log."""
    for marker in (" ERROR ", " CRITICAL ", "Traceback"):
        assert marker not in text, f"the server logged {marker.strip()}\n{server.output_tail()}"


async def admin_get(port: int, path: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(f"http://127.0.0.1:{port}{path}") as reply,
    ):
        return reply.status, await reply.json()


async def alive_count(port: int, kind: str) -> int:
    """The alive entities of a kind, read in one step from /v1/status."""
    status, body = await admin_get(port, "/v1/status")
    assert status == 200, body
    return next(int(k["entities"]) for k in body["kinds"] if k["name"] == kind)


# --- writers with a model of what they asserted ----------------------------------------------


@dataclass(frozen=True)
class Part:
    """One writer's part of one entity: whether it asserts it, and its counter there."""

    held: bool
    value: int = 0


NOT_HELD = Part(False)


@dataclass
class Track:
    """One writer's part of one entity: confirmed by SYNC, and after each unconfirmed write."""

    confirmed: Part = NOT_HELD
    unconfirmed: list[Part] = field(default_factory=list)

    @property
    def latest(self) -> Part:
        return self.unconfirmed[-1] if self.unconfirmed else self.confirmed

    def possible(self) -> list[Part]:
        """What the server may hold after a crash: the confirmed part, or the part after any
        prefix of the unconfirmed writes (a crash loses a suffix of a connection's writes)."""
        return [self.confirmed, *self.unconfirmed]


@dataclass
class Plan:
    """What a torture run does."""

    reuse_ids: bool = True
    """Re-create retracted entities (False when compaction runs: a compacted entity would start
    its versions again at 1)."""
    own_pool: int = 40
    shared: int = 16
    max_ops: int = 12
    epoch_chance: float = 0.08


class Writer:
    """An SDK writer with its own entities and a field of the shared ones; it keeps a model of
    what it asserted, confirmed or not, so that a restart can be checked against it."""

    def __init__(self, rig: Rig, source_id: int, plan: Plan, rng: random.Random) -> None:
        self.rig = rig
        self.source_id = source_id
        self.bit = 1 << source_id
        self.slot = SHARED_SLOTS.get(source_id)
        self.plan = plan
        self.rng = rng
        self.tracks: dict[int, Track] = {}
        self.pending: list[Write] = []
        self.counter = 0
        self.next_own = 0
        self.rounds = 0
        self.epochs = 0
        self.kills_seen = 0
        """The crowd's kill count when this writer last finished a round."""
        self.client: cdb.Client | None = None
        self.items: cdb.KindHandle[Item] | None = None

    async def open(self) -> None:
        self.client = await self.rig.connect(source_id=self.source_id, name=f"w{self.source_id}")
        self.items = await self.client.register_kind(Item)

    # --- the model ------------------------------------------------------------------------------

    def own_id(self, n: int) -> int:
        return self.source_id * OWN_BASE + n

    def held(self, *, own: bool) -> list[int]:
        return [
            entity
            for entity, track in self.tracks.items()
            if track.latest.held and (entity >= OWN_BASE) == own
        ]

    def _record(self, entity: int, op: Op, part: Part) -> Write:
        self.tracks.setdefault(entity, Track()).unconfirmed.append(part)
        write = self.rig.history.writes.record(self.source_id, key("torture_item", entity), op,
                                               part.value)  # fmt: skip
        self.pending.append(write)
        return write

    def _confirm(self, seq: int) -> None:
        self.rig.history.writes.confirm(self.pending, seq)
        self.pending = []
        for track in self.tracks.values():
            if track.unconfirmed:
                track.confirmed = track.unconfirmed[-1]
                track.unconfirmed = []

    def observed_part(self, entity: int, found: Found) -> Part:
        """This writer's part of an entity as the server holds it."""
        if found.status is not QueryStatus.ALIVE or not found.source_set & self.bit:
            return NOT_HELD
        value = found.value
        return Part(True, value.counter if entity >= OWN_BASE else getattr(value, self.slot or ""))

    def reconcile(self, found: dict[int, Found]) -> list[str]:
        """After a restart: check the server against the model, then take what the server
        holds as confirmed (unconfirmed writes either made it or not)."""
        complaints = []
        for entity, track in self.tracks.items():
            result = found[entity]
            part = self.observed_part(entity, result)
            own_alive = entity >= OWN_BASE and result.status is QueryStatus.ALIVE
            if own_alive and result.source_set != self.bit:
                complaints.append(f"entity {entity} of writer {self.source_id}: {result}")
            if part not in track.possible():
                complaints.append(
                    f"writer {self.source_id}, entity {entity}: the server holds {part} "
                    f"({found[entity]}); confirmed {track.confirmed}, unconfirmed "
                    f"{track.unconfirmed}"
                )
            track.confirmed, track.unconfirmed = part, []
        self.pending = []
        return complaints

    # --- writing --------------------------------------------------------------------------------

    def _next(self) -> int:
        self.counter += 1
        return self.counter

    def _meta(self, counter: int) -> bytes:
        return f"{self.source_id}:{counter}".encode()

    def _assert_own(self, batch: cdb.Batch | None, writes: list[Awaitable[None]]) -> int:
        held = self.held(own=True)
        if self.plan.reuse_ids:
            entity = self.own_id(self.rng.randrange(self.plan.own_pool))
        elif held and (len(held) >= self.plan.own_pool or self.rng.random() < 0.6):
            entity = self.rng.choice(held)
        else:
            entity = self.own_id(self.next_own)
            self.next_own += 1
        counter = self._next()
        self._record(entity, Op.ASSERT, Part(True, counter))
        assert self.items is not None
        row, meta = own_row(self.source_id, counter), self._meta(counter)
        if batch is None:
            writes.append(self.items.assert_(entity, row, meta=meta))
        else:
            batch.assert_(self.items, entity, row, meta=meta)
        return entity

    def _patch_shared(self, batch: cdb.Batch | None, writes: list[Awaitable[None]]) -> None:
        entity = self.rng.randrange(self.plan.shared)
        counter = self._next()
        self._record(entity, Op.PATCH, Part(True, counter))
        assert self.items is not None and self.slot is not None
        fields, meta = {self.slot: counter}, self._meta(counter)
        if batch is None:
            writes.append(self.items.patch(entity, fields, meta=meta))
        else:
            batch.patch(self.items, entity, fields, meta=meta)

    def _retract(self, entity: int, batch: cdb.Batch | None, writes: list[Awaitable[None]]) -> None:
        self._record(entity, Op.RETRACT, NOT_HELD)
        assert self.items is not None
        meta = f"r{self.source_id}".encode()
        if batch is None:
            writes.append(self.items.retract(entity, meta=meta))
        else:
            batch.retract(self.items, entity, meta=meta)

    def _random_write(self, batch: cdb.Batch | None, writes: list[Awaitable[None]]) -> None:
        roll = self.rng.random()
        own = self.held(own=True)
        if self.slot is not None and roll < 0.25:
            shared = self.held(own=False)
            if self.plan.reuse_ids and shared and self.rng.random() < 0.2:
                self._retract(self.rng.choice(shared), batch, writes)
            else:
                self._patch_shared(batch, writes)
        elif roll < 0.8 or not own:
            self._assert_own(batch, writes)
        else:
            self._retract(self.rng.choice(own), batch, writes)

    async def write_round(self) -> None:
        """A few random writes (as a BATCH, or one frame each), then SYNC."""
        assert self.client is not None
        count = self.rng.randint(1, self.plan.max_ops)
        if self.rng.random() < 0.7:
            async with self.client.batch() as batch:
                for _ in range(count):
                    self._random_write(batch, [])
        else:
            for _ in range(count):
                writes: list[Awaitable[None]] = []
                self._random_write(None, writes)
                for write in writes:
                    await write
        self._confirm(await self.client.sync())

    async def epoch_round(self) -> None:
        """A source epoch: re-assert most of what is held (new values), create or re-create a
        few, and let the epoch end sweep the rest."""
        assert self.client is not None and self.items is not None
        own, shared = self.held(own=True), self.held(own=False)
        baseline = await self.client.epoch_begin()
        assert baseline == len(own) + len(shared), (
            f"writer {self.source_id}: epoch baseline {baseline}, it holds {len(own) + len(shared)}"
        )
        keep = [e for e in own if self.rng.random() < 0.7]
        keep_shared = [e for e in shared if not self.plan.reuse_ids or self.rng.random() < 0.7]
        written = set(keep) | set(keep_shared)
        async with self.client.batch() as batch:
            for entity in keep:
                counter = self._next()
                self._record(entity, Op.ASSERT, Part(True, counter))
                batch.assert_(self.items, entity, own_row(self.source_id, counter),
                              meta=self._meta(counter))  # fmt: skip
            for entity in keep_shared:
                counter = self._next()
                self._record(entity, Op.PATCH, Part(True, counter))
                batch.patch(
                    self.items, entity, {self.slot or "": counter}, meta=self._meta(counter)
                )
            for _ in range(self.rng.randint(0, 3)):
                written.add(self._assert_own(batch, []))
        stale = sorted(set(own) - written) + sorted(set(shared) - written)
        for entity in stale:
            self._record(entity, Op.EPOCH_RETRACT, NOT_HELD)
        retracted = await self.client.epoch_end()
        assert retracted == len(stale), (
            f"writer {self.source_id}: the epoch end retracted {retracted}, expected {len(stale)}"
        )
        self._confirm(await self.client.sync())
        self.epochs += 1


class Crowd:
    """Writers that write until told to stop, then park while the server is down."""

    def __init__(self, writers: list[Writer]) -> None:
        self.writers = writers
        self.running = asyncio.Event()
        self.parked = {w.source_id: asyncio.Event() for w in writers}
        self.progress = asyncio.Event()
        self.stopping = False
        self.kills = 0
        """How many times the writers were paused for a kill."""
        self.tasks: list[asyncio.Task[None]] = []

    @property
    def rounds(self) -> int:
        return sum(w.rounds for w in self.writers)

    def start(self) -> None:
        self.running.set()
        self.tasks = [asyncio.create_task(self._run(w)) for w in self.writers]

    async def _run(self, writer: Writer) -> None:
        parked = self.parked[writer.source_id]
        while True:
            if not self.running.is_set():
                parked.set()
                if self.stopping:
                    return
                await self.running.wait()
                parked.clear()
            try:
                if writer.rng.random() < writer.plan.epoch_chance:
                    await writer.epoch_round()
                else:
                    await writer.write_round()
            except cdb.ConnectionLost as lost:
                if self.running.is_set():  # only a report of writes a past kill cut, if any:
                    # the first sync() after a kill says so when the call the kill interrupted
                    # was not a sync()
                    assert isinstance(lost, cdb.WritesLost) and self.kills > writer.kills_seen, (
                        f"writer {writer.source_id} lost its connection"
                    )
                    writer.kills_seen = self.kills
                continue
            writer.kills_seen = self.kills
            writer.rounds += 1
            self.progress.set()

    async def wait_rounds(self, target: int) -> None:
        """Wait until the writers have confirmed `target` rounds in all."""
        deadline = time.monotonic() + PROGRESS_TIMEOUT
        while self.rounds < target:
            self._check_tasks()
            self.progress.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"the writers confirmed {self.rounds} of {target} rounds"
            try:
                await asyncio.wait_for(self.progress.wait(), remaining)
            except TimeoutError:
                continue

    async def pause(self) -> None:
        """Stop writing (the server is being killed) and wait until every writer is parked."""
        self.running.clear()
        self.kills += 1
        for writer in self.writers:
            self._check_tasks()
            await asyncio.wait_for(self.parked[writer.source_id].wait(), RECONNECT_TIMEOUT)

    def resume(self) -> None:
        self.running.set()

    async def stop(self) -> None:
        self.stopping = True
        await self.pause()
        await asyncio.gather(*self.tasks)

    async def abandon(self) -> None:
        """Stop every writer where it is (after a failure, or once done)."""
        self.stopping = True
        self.running.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _check_tasks(self) -> None:
        for task in self.tasks:
            if task.done():
                task.result()  # a writer that died: raise why


# --- checks after a restart ------------------------------------------------------------------


def version_complaints(
    found: dict[int, Found], kind: str, before: dict[Key, int], *, may_vanish: set[int]
) -> list[str]:
    """No version went below what was observed before; NOT_FOUND only for entities that were
    never observed, or whose tombstone compaction may have removed (`may_vanish`)."""
    complaints = []
    for entity, result in found.items():
        seen = before.get(key(kind, entity), 0)
        if result.status is QueryStatus.NOT_FOUND:
            if seen and entity not in may_vanish:
                complaints.append(f"{kind} {entity}: not found after a restart, v{seen} was seen")
        elif result.version < seen:
            complaints.append(
                f"{kind} {entity}: v{result.version} after a restart, v{seen} was seen"
            )
    return complaints


def item_state_ok(history: History) -> Callable[[Key, Any, bytes | None], str | None]:
    """Whether an Item state is one the writers produced (and its metadata names the write)."""

    def check(entity_key: Key, value: Any, meta: bytes | None) -> str | None:
        if entity_key[0] == "torture_bulk":
            sent = history.writes.sent_values(entity_key, BULK_SOURCE)
            if value.owner != BULK_SOURCE or value.counter not in sent:
                return f"{value} was never written"
            return None
        if entity_key[0] == "player":
            if value not in (Player(name=f"from {DYING_SOURCE}"), Player(name="helper")):
                return f"{value} was never written"
            return None
        entity = id_to_int(entity_key[1])
        if entity >= OWN_BASE:
            return _own_state_complaint(history, entity_key, entity // OWN_BASE, value, meta)
        return _shared_state_complaint(history, entity_key, value, meta)

    return check


def _own_state_complaint(
    history: History, entity_key: Key, writer: int, value: Item, meta: bytes | None
) -> str | None:
    if value != own_row(writer, value.counter) or value.counter not in history.writes.sent_values(
        entity_key, writer
    ):
        return f"{value} was never written by writer {writer}"
    if meta is not None and meta != f"{writer}:{value.counter}".encode():
        return f"{value} arrived with the metadata {meta!r} of another write"
    return None


def _shared_state_complaint(
    history: History, entity_key: Key, value: Item, meta: bytes | None
) -> str | None:
    if (value.owner, value.counter, value.note) != (0, 0, ""):
        return f"{value}: a shared entity with an owner's fields"
    for writer, slot in SHARED_SLOTS.items():
        got = getattr(value, slot)
        if got and got not in history.writes.sent_values(entity_key, writer):
            return f"{value}: {slot}={got} was never written by writer {writer}"
    if not meta or meta.startswith(b"r"):
        return None  # the last write was a retract (a client's, or an epoch end's: no metadata)
    writer, counter = (int(part) for part in meta.decode().split(":"))
    if getattr(value, SHARED_SLOTS[writer]) != counter:
        return f"{value} arrived with the metadata {meta!r} of another write"
    return None


def contribution(entity_key: Key, value: Any, writer: int) -> int | None:
    """The counter `writer` last wrote into a state (see `history.Contribution`)."""
    kind, entity = entity_key[0], id_to_int(entity_key[1])
    if kind == "torture_bulk":
        return int(value.counter) if writer == BULK_SOURCE else None
    if kind != "torture_item":
        return None
    if entity >= OWN_BASE:
        return int(value.counter) if writer == entity // OWN_BASE else None
    slot = SHARED_SLOTS.get(writer)
    return None if slot is None else int(getattr(value, slot))


def check_history(rig: Rig, final: dict[Key, State], *, delta_resumes: bool) -> str:
    report = rig.history.check(
        final,
        state_ok=item_state_ok(rig.history),
        contribution=contribution,
        delta_resumes=delta_resumes,
    )
    report.assert_holds()
    return report.summary()


# --- random kills under mixed load (and while compaction runs) --------------------------------


@dataclass
class Outcome:
    """What a random-kill run did and found."""

    seed: int
    kills: int = 0
    rounds: int = 0
    epochs: int = 0
    entities: int = 0
    vanished: set[int] = field(default_factory=set)
    """Entities observed before a kill and not found after it (compacted tombstones)."""
    summary: str = ""

    def describe(self) -> str:
        return (
            f"seed {self.seed}; {self.rounds} write rounds, {self.epochs} epochs, "
            f"{self.entities} entities, {len(self.vanished)} compacted tombstones gone; "
            f"{self.summary}"
        )


async def run_random_kills(tmp_path: Path, kills: int, plan: Plan, *args: str) -> Outcome:
    """Three writers and two subscribers; SIGKILL at random moments, check after each restart."""
    outcome = Outcome(seed())
    rng = random.Random(outcome.seed)
    rig = Rig(tmp_path, *args)
    await rig.start()
    crowd = Crowd([Writer(rig, source, plan, random.Random(rng.random())) for source in (1, 2, 3)])
    try:
        for writer in crowd.writers:
            await writer.open()
        await rig.watch("resume", Item, ReconnectMode.RESUME)
        await rig.watch("full", Item, ReconnectMode.FULL, include_previous=True)
        assert rig.checker is not None
        items = await rig.checker.resolve_kind(Item)
        crowd.start()
        for _ in range(kills):
            await crowd.wait_rounds(crowd.rounds + rng.randint(3, 25))
            await asyncio.sleep(rng.uniform(0, 0.04))  # the random moment of the crash
            crowd.running.clear()
            await rig.kill()
            await crowd.pause()
            await restart_and_check(rig, items, crowd, outcome)
            crowd.resume()
        await crowd.wait_rounds(crowd.rounds + 5)
        await crowd.stop()
        found, _ = await query_items(rig, items, crowd)
        final = alive_states("torture_item", found)
        await rig.converge(final)
        outcome.summary = check_history(rig, final, delta_resumes=plan.reuse_ids)
        outcome.kills = rig.kills
        outcome.rounds = crowd.rounds
        outcome.epochs = sum(w.epochs for w in crowd.writers)
        outcome.entities = len(found)
        return outcome
    finally:
        await crowd.abandon()
        await rig.close()


async def restart_and_check(
    rig: Rig, items: cdb.KindHandle[Item], crowd: Crowd, outcome: Outcome
) -> None:
    """Restart, check every entity against the writers' models and the versions seen before,
    then take the server's state as the writers' confirmed state."""
    before = dict(rig.history.max_versions)
    await rig.restart()
    found, may_vanish = await query_items(rig, items, crowd)
    complaints = version_complaints(found, "torture_item", before, may_vanish=may_vanish)
    for entity, result in found.items():
        if result.status is QueryStatus.NOT_FOUND and before.get(key("torture_item", entity)):
            outcome.vanished.add(entity)
    for writer in crowd.writers:
        complaints += writer.reconcile(found)
    assert not complaints, f"after kill {rig.kills}:\n" + "\n".join(complaints[:20])


async def query_items(
    rig: Rig, items: cdb.KindHandle[Item], crowd: Crowd
) -> tuple[dict[int, Found], set[int]]:
    """Every entity any writer touched; and those whose tombstone compaction may remove."""
    entities: set[int] = set()
    may_vanish: set[int] = set()
    for writer in crowd.writers:
        entities |= writer.tracks.keys()
        for entity, track in writer.tracks.items():
            if NOT_HELD in track.possible() and entity >= OWN_BASE:
                may_vanish.add(entity)
    return await rig.query(items, sorted(entities)), may_vanish


async def test_random_kills_lose_no_confirmed_write(tmp_path: Path) -> None:
    planned = sized(6, 100)
    outcome = await run_random_kills(tmp_path, planned, Plan(), "--tombstone-retention", "86400")
    print(
        f"\ncrash torture [{mode_name()}] at random moments: survived {outcome.kills} SIGKILLs; "
        f"{outcome.describe()}"
    )
    assert outcome.kills == planned


async def test_kills_while_compaction_runs(tmp_path: Path) -> None:
    planned = sized(4, 30)
    plan = Plan(reuse_ids=False, own_pool=60, max_ops=16, epoch_chance=0.1)
    outcome = await run_random_kills(tmp_path, planned, plan, "--tombstone-retention", "0.3")
    print(
        f"\ncrash torture [{mode_name()}] while compaction runs: survived {outcome.kills} "
        f"SIGKILLs; {outcome.describe()}"
    )
    assert outcome.kills == planned
    assert outcome.vanished, "compaction removed no tombstone: the scenario did not compact"


async def test_compaction_never_removes_an_entity_written_again(tmp_path: Path) -> None:
    """A tombstone that expires while the flush re-creating its entity commits must not be
    compacted: the entity is alive again. Several loops race compaction against re-creation
    (each re-creation rides in a flush made long by filler writes); after each, a canary
    tombstone is compacted (so compaction has looked since) and the re-created entity must
    still be alive."""
    attempts, loops, retention, filler = sized(40, 400), 4, 0.05, 2000
    rig = Rig(tmp_path, "--tombstone-retention", str(retention))
    await rig.start()
    lost: list[str] = []
    done = 0
    try:
        client = await rig.connect(source_id=1, name="recreator")
        items = await client.register_kind(Item)
        rng = random.Random(seed())

        async def loop(n: int) -> None:
            nonlocal done
            entity, canary, fillers = (
                10 * n,
                10 * n + 1,
                range(OWN_BASE * (n + 1), OWN_BASE * (n + 1) + filler),
            )
            while done < attempts and not lost:
                await items.assert_(entity, own_row(1, done))
                await client.sync()
                await items.retract(entity)
                await client.sync()
                # re-create at a random moment around the tombstone's expiry, in a long flush
                await asyncio.sleep(rng.uniform(0, 0.8) * retention)
                async with client.batch() as batch:
                    batch.assert_(items, entity, own_row(1, done + 1))
                    for other in fillers:
                        batch.assert_(items, other, own_row(1, done))
                await client.sync()
                await items.assert_(canary, own_row(1, 0))
                await client.sync()
                await items.retract(canary)
                await client.sync()

                async def canary_compacted() -> bool:
                    return not (await items.query(canary)).found

                await eventually("compaction removes the canary", canary_compacted, 30)
                result = await items.query(entity)
                if not result.alive:
                    lost.append(f"entity {entity}: alive and confirmed by SYNC, now {result}")
                done += 1

        await asyncio.gather(*(loop(n) for n in range(loops)))
    finally:
        await rig.close()
    print(f"\ncompaction against re-creation [{mode_name()}]: {done} attempts, {len(lost)} lost")
    assert not lost, f"compaction removed a live entity: {lost[0]}"


async def test_a_resume_never_misses_a_deletion_that_compaction_removes_meanwhile(
    tmp_path: Path,
) -> None:
    """RESUME from a seq before a deletion, while the tombstone expires: the server either
    answers with a delta that carries the deletion, or falls back to a full bootstrap. The kind
    is big, so that compaction runs while the delta's counting pass scans it; each deleted
    entity is new, hence last in the table's order, where the scan arrives last."""
    attempts, size, retention = sized(8, 30), 60_000, 0.2
    rng = random.Random(seed())
    rig = Rig(tmp_path, "--tombstone-retention", str(retention))
    await rig.start()
    missed: list[str] = []
    try:
        writer = await WireClient.open(rig.server.host, rig.server.port)
        await writer.connect(ConnectMode.CLAIM, source_id=1)
        info = await writer.request(CreateKind(cdb.kind_model(Item).definition))
        assert isinstance(info, KindInfo), info
        row = cdb.kind_model(Item).encode(own_row(1, 1))
        for start in range(0, size, 25_000):
            entities = range(start, start + 25_000)
            writer.send(Batch(tuple(Assert(info.kind_id, id_from_int(e), row) for e in entities)))
            await writer.sync()
        reader = await WireClient.open(rig.server.host, rig.server.port)
        await reader.connect(ConnectMode.READ_ONLY)
        for attempt in range(attempts):
            doomed = id_from_int(OWN_BASE + attempt)
            writer.send(Assert(info.kind_id, doomed, row))
            since = await writer.sync()
            writer.send(Retract(info.kind_id, doomed))
            await writer.sync()
            # resume at a random moment around the tombstone's expiry
            await asyncio.sleep(retention + rng.uniform(-0.08, 0.03))
            mode, deleted = await resume(reader, info.kind_id, since, doomed, 1000 + attempt)
            if mode is cdb.BootstrapMode.DELTA and not deleted:
                missed.append(f"RESUME since {since}: a delta without the deletion at {since + 1}")
    finally:
        await rig.close()
    print(f"\nRESUME against compaction [{mode_name()}]: {attempts} resumes, {len(missed)} missed")
    assert not missed, f"a resumed subscriber keeps an entity the server deleted: {missed[0]}"


async def resume(
    reader: WireClient, kind_id: int, since: int, eid: bytes, stream: int
) -> tuple[cdb.BootstrapMode, bool]:
    """SUBSCRIBE with RESUME from `since`: the bootstrap's mode, and whether it said that `eid`
    was deleted."""
    reader.send(Subscribe(kind_id, SubscribeFlags.RESUME, since), stream)
    _, ok = await reader.reply(stream)
    assert isinstance(ok, Ok), ok
    _, begin = await reader.reply(stream)
    assert isinstance(begin, BootstrapBegin), begin
    deleted = False
    while not isinstance(frame := (await reader.reply(stream))[1], BootstrapEnd):
        deleted = deleted or (isinstance(frame, Deleted) and frame.eid == eid)
    assert isinstance(await reader.request(Unsubscribe(stream)), Ok)
    return cdb.BootstrapMode(begin.mode), deleted


# --- kills while an epoch end retracts many entities -----------------------------------------


@dataclass
class BulkWriter:
    """The writer of the bulk kind: it asserts every entity, then runs an epoch that keeps half."""

    rig: Rig
    client: cdb.Client
    handle: cdb.KindHandle[Bulk]
    size: int
    counter: int = 0

    async def assert_all(self, entities: Iterable[int]) -> int:
        """Assert `entities` with a new counter, SYNC, and return the counter."""
        self.counter += 1
        writes = []
        async with self.client.batch() as batch:
            for entity in entities:
                writes.append(self.rig.history.writes.record(
                    BULK_SOURCE, key("torture_bulk", entity), Op.ASSERT, self.counter
                ))  # fmt: skip
                batch.assert_(self.handle, entity, Bulk(BULK_SOURCE, self.counter))
        self.rig.history.writes.confirm(writes, await self.client.sync())
        return self.counter


async def test_kills_during_epoch_ends(tmp_path: Path) -> None:
    """An epoch end over thousands of entities is one flush: a crash applies all of it or none."""
    planned, size = sized(3, 20), sized(2000, 6000)
    rng = random.Random(seed_value := seed())
    rig = Rig(tmp_path, "--tombstone-retention", "86400")
    await rig.start()
    swept = {"all": 0, "none": 0}
    try:
        client = await rig.connect(source_id=BULK_SOURCE, name="bulk")
        writer = BulkWriter(rig, client, await client.register_kind(Bulk), size)
        await rig.watch("bulk-resume", Bulk, ReconnectMode.RESUME)
        await rig.watch("bulk-full", Bulk, ReconnectMode.FULL)
        assert rig.checker is not None
        checker = await rig.checker.resolve_kind(Bulk)
        for _ in range(planned):
            before_epoch = await writer.assert_all(range(size))
            assert await client.epoch_begin() == size
            keep = set(rng.sample(range(size), size // 2))
            kept = await writer.assert_all(sorted(keep))
            stale = sorted(set(range(size)) - keep)
            for entity in stale:
                rig.history.writes.record(
                    BULK_SOURCE, key("torture_bulk", entity), Op.EPOCH_RETRACT
                )
            assert await client.epoch_end() == len(stale)
            await asyncio.sleep(rng.uniform(0, 0.08))  # the random moment: the sweep's flush
            before = dict(rig.history.max_versions)
            await rig.kill()
            await rig.restart()
            found = await rig.query(checker, range(size))
            swept[epoch_outcome(found, keep, stale, kept=kept, before_epoch=before_epoch)] += 1
            complaints = version_complaints(found, "torture_bulk", before, may_vanish=set())
            assert not complaints, "\n".join(complaints[:20])
        final = alive_states("torture_bulk", await rig.query(checker, range(size)))
        await rig.converge(final)
        summary = check_history(rig, final, delta_resumes=True)
    finally:
        await rig.close()
    print(
        f"\ncrash torture [{mode_name()}] during epoch ends over {size} entities: survived "
        f"{rig.kills} SIGKILLs; seed {seed_value}; the sweep was committed {swept['all']} times, "
        f"lost whole {swept['none']} times; {summary}"
    )
    assert rig.kills == planned


def epoch_outcome(
    found: dict[int, Found], keep: set[int], stale: list[int], *, kept: int, before_epoch: int
) -> str:
    """Check one epoch end after a crash: 'all' stale entities swept, or 'none'."""
    for entity in keep:
        result = found[entity]
        assert result.status is QueryStatus.ALIVE, (entity, result)
        assert (result.value.counter, result.source_set) == (kept, 1 << BULK_SOURCE), result
    alive = [entity for entity in stale if found[entity].status is QueryStatus.ALIVE]
    assert len(alive) in (0, len(stale)), (
        f"a crash split the epoch end: {len(alive)} of {len(stale)} stale entities are alive"
    )
    for entity in alive:
        assert found[entity].value.counter == before_epoch, found[entity]
    for entity in set(stale) - set(alive):
        assert found[entity].status is QueryStatus.TOMBSTONE, (entity, found[entity])
    return "none" if alive else "all"


# --- kills while a liveness expiry retracts what a dead writer held ----------------------------


async def start_writer_process(
    port: int, source_id: int, deadline_ms: int, kind_id: int, count: int
) -> asyncio.subprocess.Process:
    """tests/writer_process.py: asserts entities 0..count-1, SYNCs, says 'ready', then hangs."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(TESTS / "writer_process.py"), str(port), str(source_id),
        str(deadline_ms), str(kind_id), "0", str(count),
        stdout=asyncio.subprocess.PIPE, cwd=TESTS, env={**os.environ, "PYTHONPATH": str(TESTS)},
    )  # fmt: skip
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 60)
    assert line.strip() == b"ready", line
    return process


async def grace_left(port: int, source_id: int) -> float:
    """Seconds until the source's liveness countdown expires, once the server has noticed its
    connection is gone (0 if it has expired already)."""
    deadline = time.monotonic() + RECONNECT_TIMEOUT
    while True:
        status, body = await admin_get(port, "/v1/status")
        assert status == 200, body
        states = [s for s in body["sources"] if s["source_id"] == source_id]
        if not states:
            return 0.0
        if states[0]["state"] == "grace":
            return float(states[0]["expires_in_ms"]) / 1000
        assert time.monotonic() < deadline, "the server never noticed the writer died"
        await asyncio.sleep(0.02)


async def test_kills_during_liveness_expiry(tmp_path: Path) -> None:
    """A dead writer's entities are retracted in one flush: a crash applies all of it or none,
    and after the restart the countdown starts again and finishes the job."""
    planned, size, shared, deadline_ms = sized(3, 20), sized(2000, 6000), 40, 1000
    rng = random.Random(seed_value := seed())
    rig = Rig(tmp_path, "--tombstone-retention", "86400")
    await rig.start()
    expired = {"all": 0, "none": 0}
    try:
        helper = await rig.connect(source_id=HELPER_SOURCE, name="helper")
        players = await helper.register_kind(Player)
        await rig.watch("player-resume", Player, ReconnectMode.RESUME)
        assert rig.checker is not None
        checker = await rig.checker.resolve_kind(Player)
        port = rig.admin_port
        for _ in range(planned):
            async with helper.batch() as batch:
                for entity in range(shared):
                    batch.assert_(players, entity, Player(name="helper"))
            await helper.sync()
            writer = await start_writer_process(
                rig.server.port, DYING_SOURCE, deadline_ms, players.kind_id, size
            )
            writer.send_signal(signal.SIGKILL)
            await writer.wait()
            left = await grace_left(port, DYING_SOURCE)
            await asyncio.sleep(max(0, left + rng.uniform(-0.05, 0.1)))  # the moment: the expiry
            before = dict(rig.history.max_versions)
            await rig.kill()
            await rig.server.start()
            alive = await alive_count(port, "player")
            assert alive in (size, shared), f"a crash split a liveness expiry: {alive} alive"
            expired["none" if alive == size else "all"] += 1
            await rig.restart_clients()

            async def retracted() -> bool:
                return await alive_count(port, "player") == shared

            await eventually("the countdown after the restart expires", retracted,
                             deadline_ms / 1000 + RECONNECT_TIMEOUT)  # fmt: skip
            found = await rig.query(checker, range(size))
            check_expired(found, shared)
            complaints = version_complaints(found, "player", before, may_vanish=set())
            assert not complaints, "\n".join(complaints[:20])
        final = alive_states("player", await rig.query(checker, range(size)))
        await rig.converge(final)
        summary = check_history(rig, final, delta_resumes=True)
        causes = {f.cause for log in rig.history.subscribers for f in log.frames if f.value is None}
        assert causes <= {cdb.DeleteCause.LIVENESS}, causes
    finally:
        await rig.close()
    print(
        f"\ncrash torture [{mode_name()}] during liveness expiries of {size} entities: survived "
        f"{rig.kills} SIGKILLs; seed {seed_value}; the expiry was committed {expired['all']} "
        f"times, lost whole {expired['none']} times (then redone); {summary}"
    )
    assert rig.kills == planned


def check_expired(found: dict[int, Found], shared: int) -> None:
    """Only the entities another source asserts are alive, and only with that source."""
    for entity, result in found.items():
        if entity < shared:
            assert result.status is QueryStatus.ALIVE, (entity, result)
            assert result.source_set == 1 << HELPER_SOURCE, (entity, result)
        else:
            assert result.status is QueryStatus.TOMBSTONE, (entity, result)


# --- the checks themselves catch what they are meant to catch ---------------------------------


UPDATED, CREATED, DELETED = cdb.ChangeType.UPDATED, cdb.ChangeType.CREATED, cdb.ChangeType.DELETED


def test_the_checks_pass_a_good_history() -> None:
    history = History()
    recorded(
        history, "x", change(CREATED, 1, 1, 5), change(CREATED, 2, 1, 5), change(UPDATED, 1, 2, 6)
    )
    recorded(
        history, "y", change(CREATED, 1, 1, 5), change(CREATED, 2, 1, 5), change(UPDATED, 1, 2, 6)
    )
    report = checked(history, {key("k", 1): State(2, 1), key("k", 2): State(1, 1)})
    report.assert_holds()


def test_the_checks_catch_versions_and_seqs_going_back() -> None:
    history = History()
    recorded(history, "x", change(CREATED, 1, 2, 6), change(UPDATED, 1, 1, 5))
    report = checked(history, {key("k", 1): State(2, 1)})
    assert len(report.ordered) == 2, report.ordered


def test_the_checks_catch_a_split_or_incomplete_flush() -> None:
    history = History()
    recorded(
        history, "x", change(CREATED, 1, 1, 5), change(CREATED, 3, 1, 6), change(CREATED, 2, 1, 5)
    )
    recorded(history, "y", change(CREATED, 1, 1, 5), change(CREATED, 3, 1, 6))
    final = {key("k", e): State(1, 1) for e in (1, 2, 3)}
    report = checked(history, final)
    assert any("split" in v for v in report.atomic), report.atomic
    assert any("without its change" in v for v in report.atomic), report.atomic


def test_the_checks_catch_two_states_under_one_version_and_a_wrong_end() -> None:
    history = History()
    recorded(history, "x", change(CREATED, 1, 1, 5, value=1))
    recorded(history, "y", change(CREATED, 1, 1, 5, value=2))
    report = checked(history, {key("k", 1): State(1, 1)})
    assert any("v1" in v for v in report.reliable), report.reliable
    assert any("y ends with" in v for v in report.reliable), report.reliable


def test_the_checks_catch_a_resume_that_was_not_a_delta() -> None:
    history = History()
    recorded(
        history, "x", change(CREATED, 1, 1, 5),
        cdb.Resubscribed(ReconnectMode.RESUME, 4),
        cdb.BootstrapStarted(cdb.BootstrapMode.FULL, 1, True),
        change(cdb.ChangeType.BOOTSTRAP, 1, 1, 5),
        cdb.BootstrapComplete(cdb.BootstrapMode.FULL, 1),
    )  # fmt: skip
    assert checked(history, {key("k", 1): State(1, 1)}).resumable
    assert not checked(history, {key("k", 1): State(1, 1)}, delta=False).resumable


def test_the_checks_catch_a_confirmed_write_that_did_not_show() -> None:
    history = History()
    write = history.writes.record(0, key("k", 1), Op.ASSERT, 7)
    history.writes.confirm([write], 5)
    recorded(history, "x", change(CREATED, 1, 1, 5, value=6))
    report = history.check(
        {key("k", 1): State(1, 6)},
        state_ok=lambda *_: None,
        contribution=lambda _key, value, _writer: int(value),
        delta_resumes=True,
    )
    assert any("older than 7" in v for v in report.reliable), report.reliable
