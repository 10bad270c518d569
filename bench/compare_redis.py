"""ConvergeDB against what a team would hand-build on Redis: the same workload on both.

The Redis build (bench/_redis_build.py) is what a team without ConvergeDB writes: a hash per
entity, one Lua script per write (EVALSHA) that keeps the source set (two 32-bit halves), the
version and deduplication (an identical re-assert changes nothing and publishes nothing), turns
an entity whose last source retracted into a tombstone, and PUBLISHes every change. Its clients
are redis-py with hiredis; it runs with its append-only file, fsync'd under each policy of
--redis-appendfsync (default everysec; several, e.g. everysec,always: one Redis column each).
`always` is the durability ConvergeDB has (every confirmed write fsync'd), so that comparison is
like for like; `everysec` (fsync once a second) is what most Redis deployments run. ConvergeDB
is a real `convergedb serve` subprocess (window 20 ms, or each window of --window-ms, e.g. 20,2;
fsync every flush), its clients the SDK: `client.batch()` writers and `Mirror` subscribers. One
server of each configuration, one after the other (--runs N: N rounds, in turn).

The workload, identical on both sides (the writers draw it from seeded generators):
- 4 writer processes, sources 1, 31, 32 and 63 (both halves of the 64-bit source set, and the
  top bit of each), 10,000 entities of a 10-field kind. Writer w owns the entities i = w mod 4;
  every tenth entity (i = 7 mod 10) is also asserted by a second source, the next writer, so a
  retract by one of its two sources leaves it alive (and unannounced). First each writer
  asserts all its entities; then every write picks a hot entity (the first 10%) with
  probability 0.8, else a cold one, and is a full-state ASSERT; when the writer holds the
  entity, 35% of writes repeat the stored state byte for byte and 4% RETRACT it instead.
- Batches of 100 writes per round trip: one BATCH frame (ConvergeDB; writes get no reply, and
  at saturation a SYNC every 50 batches bounds what is in flight) or one pipeline of 100
  EVALSHA (Redis). Every batch is encoded by the client library (SDK `Batch`, redis-py
  `pack_commands`) before its phase's clock starts, so the phases time the servers and the
  sending, not the clients' encoding; this also keeps the writers' CPU off the 2 cores the
  servers share with the subscribers.
- 4 subscriber processes each keep a mirror of the kind: ConvergeDB `Mirror` (subscribe with
  bootstrap); Redis SUBSCRIBE, then a SCAN + HGETALL bootstrap, keeping the highest version.

Two phases per system, on one server each:
1. Constant rate: --rate writes/s offered (default 5,000: what both sides sustain on this
   machine with their Python subscribers) for --seconds, each writer on a fixed schedule
   (batch b of a writer is due at start + offset + b x interval; a writer that falls behind
   sends late batches at once, skipping nothing). Every ASSERT that changes its entity carries
   its batch's intended send time (ns from the phase's start) in the `score` field of the row;
   every write also carries it as its metadata (Redis: an argument of the script, published in
   its message), so each notification says when the write that caused it was due, even when
   that write re-asserted an older state. Latency = intended send time of a changing write ->
   the first moment a subscriber's mirror applies a change of the entity caused by that write
   or a later one, for every changing write (after a 1 s warm-up) and every subscriber: writes
   that coalescing folded into a later state count too, with their own (longer) latency. No
   coordinated omission: a stall anywhere delays the notifications, not the schedule.
   Percentiles come from an HDR histogram.
2. Saturation: the writers send as fast as each server takes them for --saturation-seconds.
   Writes/s absorbed = writes / (first send -> last writer's last reply: SYNC answered, i.e.
   flushed and durable, on ConvergeDB; pipeline answered on Redis).
After each phase a marker write tells when every mirror has caught up. CPU seconds are utime +
stime (+ children's: Redis forks to rewrite its AOF, ConvergeDB's checkpointer process does
part of its work) from /proc/PID/stat, from the phase's start until the mirrors have caught
up; resident memory is VmRSS (and the peak, VmHWM) at the end, children's included.
"Notifications" are the live changes all subscribers received together.

At the end each side's state is read back from its server (every entity's source set and
fields) and checked against what the writers sent, and each mirror against it. A side that gets
anything wrong prints WRONG with the first differences and has no figure.

The machine has 2 cores, shared with other work: a figure from one run is noisy; with --runs N
each figure is the median of the N runs of its configuration (each run's latency percentiles
are listed too). The target of issue 8 is judged at each ConvergeDB window against each Redis
column separately: the saturation, latency and notification figures of a window all come from
runs at that window, those of a Redis column from runs under its policy.

    python bench/compare_redis.py [--quick] [--rate N] [--seconds S] [--saturation-seconds S]
                                  [--window-ms W[,W...]] [--redis-appendfsync P[,P...]] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import multiprocessing as mp
import os
import queue
import random
import statistics
import struct
import sys
import tempfile
import textwrap
import time
import traceback
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import convergedb as cdb
from _common import Player, source_state, start_server
from _redis_build import (
    FIELDS,
    SEPARATOR,
    describe_settings,
    ensure_redis_server,
    source_set_of,
    start_redis,
    write_script,
)

WRITERS = 4
SUBSCRIBERS = 4
SOURCES = (1, 31, 32, 63)
"""The writers' source ids: both 32-bit halves of the source set, and the top bit of each."""
MARKER_SOURCE = 5
"""The source of the bench's own marker writes."""
ENTITIES = 10_000
HOT_SHARE = 0.10
HOT_WRITES = 0.80
REPEAT_P = 0.35
RETRACT_P = 0.04
BATCH = 100
SYNC_EVERY = 50
"""ConvergeDB writers at saturation: a SYNC every this many batches."""
WARMUP_S = 1.0
SEED = 8
LEAVE = 3
"""The event that lets the child processes end."""
LEAVE_TIMEOUT = 300.0
SATURATION_STAMP = 1 << 62
"""The stamp of the saturation phase's writes (latency is not measured there)."""
KIND = "bench_player"
KEY = KIND + ":{}"
CATCH_UP_TIMEOUT = 240.0
"""Seconds the mirrors have to catch up after a phase."""
LATENCY_MAX_US = 120_000_000
TARGET_RATIO = 2.0

CHANGE, REPEAT, RETRACT = 0, 1, 2
_STAMP = struct.Struct("<q")
Op = tuple[int, int, Any, int]
"""(CHANGE, REPEAT or RETRACT, entity, values or None, stamp)."""
Canon = tuple[str, ...]
"""An entity's ten fields as the Redis build stores them: how states are compared."""


# --- the workload -----------------------------------------------------------------------------


def owner(i: int) -> int:
    return i % WRITERS


def shared(i: int) -> bool:
    """Whether entity `i` is also asserted by a second source."""
    return i % 10 == 7


def second(i: int) -> int:
    """The second writer of a shared entity."""
    return (i + 1) % WRITERS


def canon(values: Sequence[Any]) -> Canon:
    """The ten values as strings (what the Redis writers send; floats are exact in f32)."""
    name, level, hp, mana, x, y, z, online, guild, score = values
    return (
        name,
        str(level),
        str(hp),
        str(mana),
        repr(float(x)),
        repr(float(y)),
        repr(float(z)),
        "1" if online else "0",
        guild,
        str(score),
    )


class Workload:
    """One writer's writes: deterministic, so both systems get the same sequence."""

    def __init__(self, writer: int, entities: int) -> None:
        self.writer = writer
        self.rng = random.Random(f"{SEED}-{writer}")
        self.targets = [
            i for i in range(entities) if owner(i) == writer or (shared(i) and second(i) == writer)
        ]
        hot = int(entities * HOT_SHARE)
        self.hot = [i for i in self.targets if i < hot]
        self.cold = [i for i in self.targets if i >= hot]
        self.last: dict[int, tuple[Any, ...]] = {}
        """Each entity's last asserted values."""
        self.held: set[int] = set()
        """The entities this writer asserts now (its bit is set)."""
        self.gen = 0
        self.counts = [0, 0, 0]
        self.journal: list[tuple[int, int, bool, tuple[Any, ...] | None]] = []
        """(op, entity, held before, last before) of each write, to take writes back."""

    def change(self, i: int, stamp: int) -> Op:
        self.journal.append((CHANGE, i, i in self.held, self.last.get(i)))
        self.gen += 1
        g = self.gen
        values = (
            f"player-{i}",
            i % 90,
            g & 0xFFFF_FFFF,
            self.writer,
            (i % 1000) * 0.5,
            float(g % 1000),
            1.5,
            i % 2 == 0,
            "red",
            stamp,
        )
        self.last[i] = values
        self.held.add(i)
        self.counts[CHANGE] += 1
        return CHANGE, i, values, stamp

    def initial(self) -> list[Op]:
        ops = [self.change(i, 0) for i in self.targets]
        self.counts = [0, 0, 0]
        return ops

    def next(self, stamp: int) -> Op:
        rng = self.rng.random
        pool = self.hot if rng() < HOT_WRITES else self.cold
        i = pool[int(rng() * len(pool))]
        if i in self.held:
            r = rng()
            if r < RETRACT_P:
                self.journal.append((RETRACT, i, True, self.last[i]))
                self.held.discard(i)
                self.counts[RETRACT] += 1
                return RETRACT, i, None, stamp
            if r < RETRACT_P + REPEAT_P:
                self.journal.append((REPEAT, i, True, self.last[i]))
                self.counts[REPEAT] += 1
                return REPEAT, i, self.last[i], stamp
        return self.change(i, stamp)

    def undo(self, count: int) -> None:
        """Take back the last `count` writes (generated, never sent)."""
        for _ in range(count):
            op, i, held, last = self.journal.pop()
            self.counts[op] -= 1
            if held:
                self.held.add(i)
            else:
                self.held.discard(i)
            if last is None:
                self.last.pop(i, None)
            else:
                self.last[i] = last


# --- plans and results passed between processes -----------------------------------------------


@dataclass(frozen=True)
class Plan:
    system: str
    """"cdb" or "redis"."""
    host: str
    port: int
    entities: int
    rate: int
    seconds: float
    saturation_seconds: float
    pool_batches: int
    """Batches each writer encodes for the saturation phase."""
    sha: str = ""
    """The Redis write script's SHA-1."""


@dataclass
class PhaseResult:
    writes: int
    counts: list[int]
    first_send_ns: int
    last_reply_ns: int
    max_late_ns: int = 0
    exhausted_ns: int = 0
    """When the writer had sent its whole pool of encoded batches (0: it never did)."""
    folded: int = 0
    """Changing writes that the same batch retracts afterwards (not in the latency figures)."""
    two_sources: int = 0
    """Changing writes to entities two sources assert (not in the latency figures)."""
    change_ids: bytes = b""
    """array('q') of the entities of the changing writes (constant phase)."""
    change_stamps: bytes = b""
    """array('q') of their intended send times, from the phase's start."""


@dataclass
class WriterModel:
    writer: int
    held: list[int]
    last: dict[int, Canon]


@dataclass
class SubscriberFinal:
    index: int
    mirror: dict[int, Canon]
    notifications: list[int]
    """Live notifications received in each phase (markers excluded)."""
    ids: bytes
    """array('q'): entity of each notification of the constant phase, in arrival order."""
    stamps: bytes
    """array('q'): the stamp of the (last) write that caused it."""
    arrivals: bytes
    """array('q'): when the mirror applied it (monotonic ns)."""
    bootstrap_entities: int


# --- writers ----------------------------------------------------------------------------------


class CdbWriter:
    """A writer on ConvergeDB through the SDK: each batch is an SDK `Batch` (one BATCH frame)."""

    def __init__(self, plan: Plan, writer: int) -> None:
        self.plan = plan
        self.writer = writer
        self.batches = 0

    async def open(self) -> None:
        self.client = await cdb.connect(
            self.plan.host,
            self.plan.port,
            source_id=SOURCES[self.writer],
            name=f"bench-writer-{self.writer}",
        )
        self.handle = await self.client.register_kind(Player)

    def encode(self, ops: list[Op]) -> Any:
        batch = self.client.batch()
        handle = self.handle
        for op, i, value, stamp in ops:
            if op == RETRACT:
                batch.retract(handle, i, meta=_STAMP.pack(stamp))
            else:
                batch.assert_(handle, i, Player(*value), meta=_STAMP.pack(stamp))
        return batch

    async def send(self, encoded: Any, saturating: bool = False) -> None:
        await encoded.flush()
        self.batches += 1
        if saturating and self.batches % SYNC_EVERY == 0:
            await self.client.sync()

    async def barrier(self) -> None:
        await self.client.sync()

    async def close(self) -> None:
        await self.client.close()


class RedisWriter:
    """A writer on the Redis build: each batch is a pipeline of 100 EVALSHA, packed by
    redis-py, sent in one write, its 100 replies read back (one round trip)."""

    def __init__(self, plan: Plan, writer: int) -> None:
        import redis

        self.redis = redis.Redis(host=plan.host, port=plan.port)
        self.sha = plan.sha
        self.source = str(SOURCES[writer])
        self.keys = [KEY.format(i) for i in range(plan.entities)]
        self.ids = [str(i) for i in range(plan.entities)]

    async def open(self) -> None:
        self.connection = self.redis.connection_pool.get_connection()
        self.connection.send_command("PING")
        self.connection.read_response()

    def encode(self, ops: list[Op]) -> Any:
        sha, source, keys, ids = self.sha, self.source, self.keys, self.ids
        commands: list[tuple[Any, ...]] = []
        for op, i, value, stamp in ops:
            if op == RETRACT:
                commands.append(("EVALSHA", sha, 1, keys[i], "R", source, ids[i], stamp))
            else:
                commands.append(
                    ("EVALSHA", sha, 1, keys[i], "A", source, ids[i], stamp, *canon(value))
                )
        return len(commands), self.connection.pack_commands(commands)

    async def send(self, encoded: Any, saturating: bool = False) -> None:
        count, packed = encoded
        connection = self.connection
        connection.send_packed_command(packed, check_health=False)
        for _ in range(count):
            connection.read_response()  # an error reply raises

    async def barrier(self) -> None:
        pass  # every pipeline was answered

    async def close(self) -> None:
        self.redis.connection_pool.release(self.connection)
        self.redis.close()


def writer_main(
    plan: Plan,
    writer: int,
    go: Sequence[Any],
    start_ns: Any,
    events: mp.Queue[Any],
) -> None:  # pragma: no cover - runs in a child process
    try:
        asyncio.run(_writer(plan, writer, go, start_ns, events))
    except BaseException as exc:
        events.put(("error", f"writer {writer}", repr(exc)))
        raise
    go[LEAVE].wait(LEAVE_TIMEOUT)  # alive until the parent has read its CPU time


async def _writer(
    plan: Plan, writer: int, go: Sequence[Any], start_ns: Any, events: mp.Queue[Any]
) -> None:
    """Load, then the constant-rate phase, then the saturation phase. Every batch is encoded
    before its phase's clock starts, so a phase measures sending, not the client's encoding."""
    driver: CdbWriter | RedisWriter = (
        CdbWriter(plan, writer) if plan.system == "cdb" else RedisWriter(plan, writer)
    )
    await driver.open()
    work = Workload(writer, plan.entities)
    ops = work.initial()
    for start in range(0, len(ops), BATCH):
        await driver.send(driver.encode(ops[start : start + BATCH]))
    await driver.barrier()

    # phase 1, constant rate: batch b is due at offset + b x interval from the phase's start,
    # which is also its stamp (the parent knows the start)
    per_writer = plan.rate / WRITERS
    interval = BATCH / per_writer * 1e9
    total = int(per_writer * plan.seconds / BATCH)
    offset = writer * interval / WRITERS
    change_ids, change_stamps = array("q"), array("q")
    folded = two_sources = 0
    schedule: list[tuple[int, Any]] = []
    for b in range(total):
        due = int(offset + b * interval)
        batch = [work.next(due) for _ in range(BATCH)]
        retracted_later: set[int] = set()
        for op, i, _, _ in reversed(batch):
            if op == RETRACT:
                retracted_later.add(i)
            elif op == CHANGE and shared(i):
                two_sources += 1  # see measure_latency
            elif op == CHANGE and i in retracted_later:
                folded += 1  # see measure_latency
            elif op == CHANGE:
                change_ids.append(i)
                change_stamps.append(due)
        schedule.append((due, driver.encode(batch)))
    counts, work.counts = work.counts, [0, 0, 0]
    events.put(("loaded", writer))
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, go[0].wait)
    start = start_ns.value
    late = 0
    first = 0
    for due, encoded in schedule:
        delay = start + due - time.monotonic_ns()
        if delay > 0:
            await asyncio.sleep(delay / 1e9)
        now = time.monotonic_ns()
        late = max(late, now - start - due)
        first = first or now
        await driver.send(encoded)
    await driver.barrier()
    schedule = []
    events.put(
        (
            "phase",
            writer,
            0,
            PhaseResult(
                total * BATCH,
                counts,
                first,
                time.monotonic_ns(),
                max_late_ns=late,
                folded=folded,
                two_sources=two_sources,
                change_ids=change_ids.tobytes(),
                change_stamps=change_stamps.tobytes(),
            ),
        )
    )

    # phase 2, saturation: a pool of encoded batches, sent back to back
    await loop.run_in_executor(None, go[1].wait)
    pool = [
        driver.encode([work.next(SATURATION_STAMP) for _ in range(BATCH)])
        for _ in range(plan.pool_batches)
    ]
    events.put(("prepared", writer))
    await loop.run_in_executor(None, go[2].wait)
    start = start_ns.value
    delay = start - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)
    deadline = start + int(plan.saturation_seconds * 1e9)
    first = time.monotonic_ns()
    sent = 0
    pool.reverse()
    exhausted = 0
    while time.monotonic_ns() < deadline:
        if pool:
            encoded = pool.pop()
        else:  # more than the pool: encoded on the way (slower), and said
            exhausted = exhausted or time.monotonic_ns() - first
            encoded = driver.encode([work.next(SATURATION_STAMP) for _ in range(BATCH)])
        await driver.send(encoded, saturating=True)
        sent += BATCH
    await driver.barrier()
    # the writes of the pool that were not sent never happened: the model forgets them
    work.undo(len(pool) * BATCH)
    events.put(
        (
            "phase",
            writer,
            1,
            PhaseResult(sent, work.counts, first, time.monotonic_ns(), exhausted_ns=exhausted),
        )
    )
    model = WriterModel(writer, sorted(work.held), {i: canon(v) for i, v in work.last.items()})
    events.put(("model", writer, model))
    await driver.close()


# --- subscribers ------------------------------------------------------------------------------


class Recorder:
    """What a subscriber notes as its mirror applies live changes."""

    def __init__(self, index: int, entities: int, events: mp.Queue[Any]) -> None:
        self.index = index
        self.entities = entities
        self.events = events
        self.phase = 0
        self.notifications = [0, 0]
        self.ids, self.stamps, self.arrivals = array("q"), array("q"), array("q")
        self.done = False

    def applied(self, i: int, stamp: int) -> None:
        """The mirror applied a live change of entity `i` carrying `stamp`."""
        if i >= self.entities:  # the marker
            if stamp == self.phase + 1:
                self.events.put(("marker", self.index, stamp))
                self.phase = stamp
                self.done = stamp == 2
            return
        self.notifications[self.phase] += 1
        if self.phase == 0:
            self.ids.append(i)
            self.stamps.append(stamp)
            self.arrivals.append(time.monotonic_ns())

    def final(self, mirror: dict[int, Canon], bootstrap_entities: int) -> SubscriberFinal:
        return SubscriberFinal(
            self.index,
            {i: v for i, v in mirror.items() if i < self.entities},
            self.notifications,
            self.ids.tobytes(),
            self.stamps.tobytes(),
            self.arrivals.tobytes(),
            bootstrap_entities,
        )


def subscriber_main(
    plan: Plan, index: int, go: Sequence[Any], events: mp.Queue[Any]
) -> None:  # pragma: no cover - runs in a child process
    try:
        if plan.system == "cdb":
            asyncio.run(_cdb_subscriber(plan, index, events))
        else:
            _redis_subscriber(plan, index, events)
    except BaseException as exc:
        events.put(("error", f"subscriber {index}", repr(exc)))
        raise
    go[LEAVE].wait(LEAVE_TIMEOUT)  # alive until the parent has read its CPU time


async def _cdb_subscriber(plan: Plan, index: int, events: mp.Queue[Any]) -> None:
    recorder = Recorder(index, plan.entities, events)
    finished = asyncio.Event()
    id_to_int = cdb.id_to_int
    bootstrap = cdb.ChangeType.BOOTSTRAP

    def on_change(change: cdb.Change[Player]) -> None:
        if change.type is bootstrap:
            return
        meta = change.meta  # the stamp of the (last) write that caused the change
        stamp = _STAMP.unpack(meta)[0] if len(meta) == _STAMP.size else 0
        recorder.applied(id_to_int(change.entity_id), stamp)
        if recorder.done:
            finished.set()

    async with cdb.connect(
        plan.host, plan.port, read_only=True, name=f"bench-sub-{index}"
    ) as client:
        handle = await client.resolve_kind(Player)
        async with cdb.Mirror(handle, on_change=on_change) as mirror:
            await mirror.wait_synced()
            bootstrapped = len(mirror)
            events.put(("ready", index))
            await finished.wait()
            entries = mirror.entries()
    names = FIELDS
    snapshot = {
        id_to_int(eid): canon([getattr(entry.value, n) for n in names])
        for eid, entry in entries.items()
    }
    events.put(("final", index, recorder.final(snapshot, bootstrapped)))


def _redis_subscriber(plan: Plan, index: int, events: mp.Queue[Any]) -> None:
    import redis

    recorder = Recorder(index, plan.entities, events)
    client = redis.Redis(host=plan.host, port=plan.port)
    pubsub = client.pubsub()
    pubsub.subscribe(KIND)
    deadline = time.monotonic() + 60
    while True:  # registered before the bootstrap reads anything
        message = pubsub.get_message(timeout=1.0)
        if message is not None and message["type"] == "subscribe":
            break
        if time.monotonic() > deadline:
            raise TimeoutError("SUBSCRIBE was not confirmed")
    values: dict[int, tuple[bytes, ...]] = {}
    versions: dict[int, int] = {}
    keys = list(client.scan_iter(match=KIND + ":*", count=1000))
    for start in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        part = keys[start : start + 1000]
        for key in part:
            pipe.hgetall(key)
        for key, stored in zip(part, pipe.execute(), strict=True):
            if not stored:
                continue  # expired meanwhile
            i = int(key.rsplit(b":", 1)[1])
            version = int(stored[b"_v"])
            if version <= versions.get(i, 0):
                continue
            versions[i] = version
            if source_set_of(stored[b"_s0"], stored[b"_s1"]):
                values[i] = tuple(stored[name.encode()] for name in FIELDS)
            else:
                values.pop(i, None)
    bootstrapped = len(values)
    events.put(("ready", index))
    separator = SEPARATOR.encode()
    get_message = pubsub.get_message
    applied = recorder.applied
    while not recorder.done:
        message = get_message(timeout=1.0)
        if message is None or message["type"] != "message":
            continue
        parts = message["data"].split(separator)
        i = int(parts[1])
        version = int(parts[2])
        if version <= versions.get(i, 0):
            continue
        versions[i] = version
        if parts[0] == b"D":
            values.pop(i, None)
        else:
            values[i] = tuple(parts[4:])
        applied(i, int(parts[3]))
    pubsub.close()
    client.close()
    snapshot = {i: tuple(v.decode() for v in value) for i, value in values.items()}
    events.put(("final", index, recorder.final(snapshot, bootstrapped)))


# --- the bench's own writes and reads ---------------------------------------------------------


def marker_values(phase: int) -> tuple[Any, ...]:
    return ("marker", 0, phase, 0, 0.0, 0.0, 0.0, False, "", phase)


async def _cdb_marker(host: str, port: int, entities: int, phase: int) -> None:
    async with cdb.connect(
        host, port, source_id=MARKER_SOURCE, name="bench-marker", liveness_deadline_ms=300_000
    ) as client:
        handle = await client.register_kind(Player)
        await handle.assert_(entities, Player(*marker_values(phase)), meta=_STAMP.pack(phase))
        await client.sync()


async def _cdb_read_back(
    host: str, port: int, entities: int
) -> dict[int, tuple[int, Canon | None]]:
    async with cdb.connect(host, port, read_only=True, name="bench-check") as client:
        handle = await client.resolve_kind(Player)
        state: dict[int, tuple[int, Canon | None]] = {}
        for start in range(0, entities, 500):
            ids = range(start, min(start + 500, entities))
            results = await asyncio.gather(*(handle.query(i) for i in ids))
            for i, result in zip(ids, results, strict=True):
                value = result.value
                state[i] = (
                    result.source_set,
                    canon([getattr(value, n) for n in FIELDS]) if result.alive else None,
                )
        return state


def _redis_read_back(port: int, entities: int) -> dict[int, tuple[int, Canon | None]]:
    import redis

    client = redis.Redis(port=port, decode_responses=True)
    pipe = client.pipeline(transaction=False)
    for i in range(entities):
        pipe.hgetall(KEY.format(i))
    state: dict[int, tuple[int, Canon | None]] = {}
    for i, stored in enumerate(pipe.execute()):
        if not stored:
            state[i] = (0, None)
            continue
        sources = source_set_of(stored["_s0"], stored["_s1"])
        state[i] = (sources, tuple(stored[n] for n in FIELDS) if sources else None)
    client.close()
    return state


# --- process figures --------------------------------------------------------------------------


def live_children(pid: int) -> list[int]:
    """The processes `pid` started that still run (ConvergeDB's checkpointer, a Redis fork)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(child) for child in text.split()]


def cpu_seconds(pid: int, children: bool = True) -> float:
    """utime + stime of a process, with `children`: plus its reaped children's (cutime +
    cstime: a fork's work, once reaped) and its live children's (the checkpointer process of
    ConvergeDB does part of the server's work)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    own = ticks / os.sysconf("SC_CLK_TCK")
    if not children:
        return own
    return own + sum(cpu_seconds(child) for child in live_children(pid))


def memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in bytes, of the process and its live children together."""
    figures = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(rest.split()[0]) * 1024
    rss, hwm = figures["VmRSS"], figures["VmHWM"]
    for child in live_children(pid):
        with contextlib.suppress(OSError, KeyError):
            child_rss, child_hwm = memory(child)
            rss, hwm = rss + child_rss, hwm + child_hwm
    return rss, hwm


# --- one system -------------------------------------------------------------------------------


@dataclass
class PhaseFigures:
    writes: int = 0
    counts: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: float = 0.0
    """First send -> last writer's last reply."""
    notifications: int = 0
    server_cpu: float = 0.0
    writer_cpu: float = 0.0
    subscriber_cpu: float = 0.0
    catch_up: float = 0.0
    """Last writer's last reply -> every mirror saw the marker."""
    max_late_ms: float = 0.0
    exhausted: int = 0
    """Writers that sent their whole pool of encoded batches (and encoded more on the way)."""

    @property
    def rate(self) -> float:
        return self.writes / self.seconds if self.seconds else 0.0


@dataclass
class Latency:
    folded: int
    """Changing writes left out: their batch retracts the entity afterwards."""
    two_sources: int
    """Changing writes left out: to entities that two sources assert."""
    p50: float
    p99: float
    p999: float
    max: float
    samples: int
    unmatched: int


@dataclass
class SystemResult:
    name: str
    description: str
    phases: list[PhaseFigures]
    latency: Latency | None
    rss: int
    hwm: int
    problems: list[str]
    alive: int
    bootstrap: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems


class Run:
    """The child processes of one system's run, and the events they report."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.events: mp.Queue[Any] = self.ctx.Queue()
        self.processes: list[mp.process.BaseProcess] = []
        self.backlog: list[tuple[Any, ...]] = []

    def spawn(self, target: Callable[..., None], *args: Any) -> mp.process.BaseProcess:
        process = self.ctx.Process(target=target, args=(*args, self.events), daemon=True)
        process.start()
        self.processes.append(process)
        return process

    def wait_for(self, kind: str, count: int, timeout: float, what: str) -> list[tuple[Any, ...]]:
        """The next `count` events of `kind`; events of other kinds are kept for later."""
        found = [event for event in self.backlog if event[0] == kind][:count]
        for event in found:
            self.backlog.remove(event)
        deadline = time.monotonic() + timeout
        while len(found) < count:
            try:
                event = self.events.get(timeout=0.5)
            except queue.Empty:
                dead = [p for p in self.processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a child process died (exit {dead[0].exitcode}) while waiting for {what}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{what}: {len(found)} of {count} after {timeout:.0f} s"
                    ) from None
                continue
            if event[0] == "error":
                raise RuntimeError(f"{event[1]} failed: {event[2]}")
            if event[0] == kind:
                found.append(event)
            else:
                self.backlog.append(event)
        return found

    def close(self, failed: bool) -> None:
        """Wait for the children (they end by themselves), or end them at once after a failure."""
        for process in self.processes:
            if not failed:
                process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()


def run_system(column: Column, args: argparse.Namespace, workdir: Path) -> SystemResult:
    """One run of `column`'s configuration: its server, the two phases, the check."""
    started = time.monotonic()
    system, name = column.system, column.name
    if system == "cdb":
        server = start_server(workdir / "data", "--window-ms", str(column.window_ms), "--fsync")
        pid, host, port, sha = server.process.pid, server.host, server.port, ""
        description = f"convergedb serve, {column.setting}"
        stop: Callable[[], object] = server.stop
    else:
        import redis

        rserver = start_redis(args.redis_binary, workdir / "redis", column.appendfsync)
        pid, host, port = rserver.process.pid, "127.0.0.1", rserver.port
        client = redis.Redis(port=port)
        sha = str(client.script_load(write_script(KIND)))
        description = f"redis-server {rserver.version}, {column.setting}"
        stop = rserver.stop
    plan = Plan(
        system,
        host,
        port,
        ENTITIES,
        args.rate,
        args.seconds,
        args.saturation_seconds,
        args.pool_batches,
        sha,
    )
    run = Run()
    go = [run.ctx.Event() for _ in range(4)]
    """Start phase 1; encode the pool of phase 2; start phase 2; leave (LEAVE)."""
    start_ns = run.ctx.Value("q", 0)
    phases = [PhaseFigures(), PhaseFigures()]
    failed = True
    try:
        writers = [run.spawn(writer_main, plan, w, go, start_ns) for w in range(WRITERS)]
        run.wait_for("loaded", WRITERS, 300, "the writers' initial asserts and encoding")
        subscribers = [run.spawn(subscriber_main, plan, s, go) for s in range(SUBSCRIBERS)]
        run.wait_for("ready", SUBSCRIBERS, 120, "the subscribers' bootstrap")
        finals: list[SubscriberFinal] = []
        models: list[WriterModel] = []
        results: list[list[PhaseResult]] = [[], []]
        for phase in (0, 1):
            figures = phases[phase]
            if phase == 1:
                go[1].set()
                run.wait_for("prepared", WRITERS, 300, "the writers' encoding")
            server_cpu = cpu_seconds(pid)
            writer_cpu = sum(cpu_seconds(p.pid or 0) for p in writers)
            subscriber_cpu = sum(cpu_seconds(p.pid or 0) for p in subscribers)
            start_ns.value = time.monotonic_ns() + 200_000_000
            if phase == 0:
                constant_start = start_ns.value
            go[2 * phase].set()
            for event in run.wait_for("phase", WRITERS, args.seconds + 600, f"phase {phase + 1}"):
                results[phase].append(event[3])
            if phase == 1:
                models = [e[2] for e in run.wait_for("model", WRITERS, 60, "the writers' models")]
            replied = max(r.last_reply_ns for r in results[phase])
            if system == "cdb":
                asyncio.run(_cdb_marker(host, port, ENTITIES, phase + 1))
            else:
                client.evalsha(
                    sha,
                    1,
                    KEY.format(ENTITIES),
                    "A",
                    str(MARKER_SOURCE),
                    str(ENTITIES),
                    phase + 1,
                    *canon(marker_values(phase + 1)),
                )
            run.wait_for("marker", SUBSCRIBERS, CATCH_UP_TIMEOUT, "the mirrors to catch up")
            caught_up = time.monotonic_ns()
            figures.server_cpu = cpu_seconds(pid) - server_cpu
            figures.writer_cpu = sum(cpu_seconds(p.pid or 0) for p in writers) - writer_cpu
            figures.subscriber_cpu = (
                sum(cpu_seconds(p.pid or 0) for p in subscribers) - subscriber_cpu
            )
            first = min(r.first_send_ns for r in results[phase])
            figures.writes = sum(r.writes for r in results[phase])
            figures.counts = [sum(r.counts[k] for r in results[phase]) for k in range(3)]
            figures.seconds = (replied - first) / 1e9
            figures.catch_up = (caught_up - replied) / 1e9
            figures.max_late_ms = max(r.max_late_ns for r in results[phase]) / 1e6
            figures.exhausted = sum(1 for r in results[phase] if r.exhausted_ns)
        finals = [e[2] for e in run.wait_for("final", SUBSCRIBERS, 120, "the mirrors' contents")]
        rss, hwm = memory(pid)
        if system == "cdb":
            state = asyncio.run(_cdb_read_back(host, port, ENTITIES))
        else:
            state = _redis_read_back(port, ENTITIES)
            client.close()
        failed = False
    finally:
        go[LEAVE].set()
        run.close(failed)
        stop()
    for figures, phase in zip(phases, (0, 1), strict=True):
        figures.notifications = sum(f.notifications[phase] for f in finals)
    problems = check(state, models, finals)
    latency = measure_latency(constant_start, finals, results[0])
    return SystemResult(
        name,
        description,
        phases,
        latency,
        rss,
        hwm,
        problems,
        sum(1 for s, _ in state.values() if s),
        min(f.bootstrap_entities for f in finals),
        time.monotonic() - started,
    )


# --- checking and measuring -------------------------------------------------------------------


def check(
    state: dict[int, tuple[int, Canon | None]],
    models: list[WriterModel],
    finals: list[SubscriberFinal],
) -> list[str]:
    """What is wrong: the server's state against what the writers sent, each mirror against the
    server's state."""
    problems: list[str] = []
    expected_sets = [0] * len(state)
    asserted: list[list[Canon]] = [[] for _ in state]
    for model in models:
        for i in model.held:
            expected_sets[i] |= 1 << SOURCES[model.writer]
        for i, last in model.last.items():
            asserted[i].append(last)
    for i, (sources, values) in sorted(state.items()):
        if sources != expected_sets[i]:
            problems.append(
                f"server: entity {i} has sources {sources:#x}, "
                f"the writers left {expected_sets[i]:#x}"
            )
        elif sources and values not in asserted[i]:
            problems.append(f"server: entity {i} holds {values}, which no writer asserted last")
        elif sources and not shared(i) and values != asserted[i][0]:
            problems.append(
                f"server: entity {i} holds {values}, its writer's last is {asserted[i][0]}"
            )
    alive = {i: values for i, (sources, values) in state.items() if sources}
    for final in finals:
        mirror = final.mirror
        missing = sorted(set(alive) - set(mirror))
        extra = sorted(set(mirror) - set(alive))
        differ = sorted(i for i in set(alive) & set(mirror) if alive[i] != mirror[i])
        where = f"mirror {final.index}"
        if missing:
            problems.append(f"{where}: {len(missing)} alive entities missing, e.g. {missing[:3]}")
        if extra:
            problems.append(f"{where}: {len(extra)} deleted entities still there, e.g. {extra[:3]}")
        if differ:
            i = differ[0]
            problems.append(
                f"{where}: {len(differ)} entities differ, e.g. {i}: {mirror[i]} "
                f"instead of {alive[i]}"
            )
    return problems


def measure_latency(
    start: int, finals: list[SubscriberFinal], writes: list[PhaseResult]
) -> Latency | None:
    """Intended send time of each changing write -> the first arrival, at each subscriber, of a
    notification of the same entity caused by that write or a later one (its stamp is later).

    Two kinds of changing writes are left out (the writers do not list them), because
    ConvergeDB may fold them into nothing: the state after the flush is the state before it, so
    no notification will ever say when the mirror "had" them (while Redis announces each
    write): a write that its batch retracts afterwards (re-created, then deleted again), and a
    write to an entity that two sources assert (source A's state, then source B re-asserting the
    state it had, in one window). Each side is measured on the same writes."""
    from hdrh.histogram import HdrHistogram  # the bench extra

    histogram = HdrHistogram(1, LATENCY_MAX_US, 3)
    counted_from = int(WARMUP_S * 1e9)  # stamps count from the phase's start
    wanted: list[tuple[int, int]] = []
    for result in writes:
        for i, stamp in zip(
            array("q", result.change_ids), array("q", result.change_stamps), strict=True
        ):
            if stamp >= counted_from:
                wanted.append((i, stamp))
    unmatched = 0
    worst = 0
    for final in finals:
        # per entity: the running maximum of the stamps received, and when each arrived
        highest: dict[int, list[int]] = {}
        arrived: dict[int, list[int]] = {}
        for i, stamp, at in zip(
            array("q", final.ids), array("q", final.stamps), array("q", final.arrivals), strict=True
        ):
            stamps = highest.get(i)
            if stamps is None:
                highest[i], arrived[i] = [stamp], [at]
            elif stamp > stamps[-1]:
                stamps.append(stamp)
                arrived[i].append(at)
        for i, stamp in wanted:
            stamps = highest.get(i)
            k = bisect.bisect_left(stamps, stamp) if stamps else 0
            if stamps is None or k == len(stamps):
                unmatched += 1
                continue
            micros = max(1, (arrived[i][k] - start - stamp) // 1000)
            worst = max(worst, micros)
            histogram.record_value(min(micros, LATENCY_MAX_US))
    if not histogram.get_total_count():
        return None
    return Latency(
        sum(r.folded for r in writes),
        sum(r.two_sources for r in writes),
        histogram.get_value_at_percentile(50) / 1000,
        histogram.get_value_at_percentile(99) / 1000,
        histogram.get_value_at_percentile(99.9) / 1000,
        worst / 1000,
        histogram.get_total_count(),
        unmatched,
    )


# --- the report -------------------------------------------------------------------------------


Row = tuple[str, Callable[[SystemResult], float | None], str, str]
"""(label, figure, format, which way is better: "up", "down" or "")."""


@dataclass
class Column:
    """One configuration of the comparison (ConvergeDB at one window, or the Redis build under
    one AOF fsync policy) and its runs; each figure it prints is the median over the runs."""

    system: str
    """"cdb" or "redis"."""
    window_ms: int = 0
    """ConvergeDB's coalescing window."""
    appendfsync: str = ""
    """The Redis build's AOF fsync policy."""
    runs: list[SystemResult] = field(default_factory=list)

    @property
    def short(self) -> str:
        """What sets this configuration apart from the others of its system: "20 ms", "always"."""
        return f"{self.window_ms} ms" if self.system == "cdb" else self.appendfsync

    @property
    def name(self) -> str:
        return f"{'CDB' if self.system == 'cdb' else 'Redis'} {self.short}"

    @property
    def setting(self) -> str:
        return (
            f"window {self.window_ms} ms"
            if self.system == "cdb"
            else f"appendfsync {self.appendfsync}"
        )

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def figure(self, figure: Callable[[SystemResult], float | None]) -> float | None:
        """The median over the runs (None when a run has no such figure)."""
        values = [figure(r) for r in self.runs]
        if not values or any(v is None for v in values):
            return None
        return statistics.median(v for v in values if v is not None)


def comparisons(columns: Sequence[Column]) -> list[tuple[Column, Column]]:
    """(ConvergeDB column, Redis column): each ConvergeDB column against each Redis column,
    grouped by Redis column."""
    return [
        (ours, theirs)
        for theirs in columns
        if theirs.system == "redis"
        for ours in columns
        if ours.system == "cdb"
    ]


def column_width(columns: Sequence[Column]) -> int:
    return max(14, *(len(c.name) + 2 for c in columns))


def print_table(title: str, rows: Sequence[Row], columns: Sequence[Column]) -> None:
    """One column per configuration, then each ConvergeDB column's ratio to each Redis column
    ("20 ms/always": ConvergeDB at 20 ms over Redis with appendfsync always)."""
    pairs = comparisons(columns)
    labels = ["ratio"] if len(pairs) == 1 else [f"{a.short}/{b.short}" for a, b in pairs]
    width = column_width(columns)
    ratio_width = max(12, *(len(label) + 2 for label in labels))
    header = f"  {'':<42}" + "".join(f"{c.name:>{width}}" for c in columns)
    header += "".join(f"{label:>{ratio_width}}" for label in labels)
    print(f"\n{title}\n{header}")
    for label, figure, fmt, better in rows:
        line = f"  {label:<42}"
        values: dict[str, float | None] = {}
        for column in columns:
            value = values[column.name] = column.figure(figure) if column.ok else None
            shown = "WRONG" if not column.ok else "-" if value is None else format(value, fmt)
            line += f"{shown:>{width}}"
        if better and pairs:
            for ours, theirs in pairs:
                a, b = values[ours.name], values[theirs.name]
                shown = "-" if a is None or b is None or not b else f"{a / b:.2f}x"
                line += f"{shown:>{ratio_width}}"
            line += f"  ({'higher' if better == 'up' else 'lower'} is better)"
        print(line)


def notification_rows(phase: int, better: str) -> list[Row]:
    """The rows of a phase's notifications: the total (`better`: its hint, none where the
    systems absorbed different numbers of writes) and per write, per mirror."""
    return [
        (
            f"notifications delivered ({SUBSCRIBERS} mirrors)",
            lambda r: r.phases[phase].notifications,
            ",.0f",
            better,
        ),
        (
            "  per write, per mirror",
            lambda r: r.phases[phase].notifications / SUBSCRIBERS / r.phases[phase].writes,
            ".3f",
            "down",
        ),
    ]


def client_cpu_rows(phase: int, better: str) -> list[Row]:
    """The rows of a phase's writer and subscriber CPU seconds (`better`: their hint, none
    where the systems absorbed different numbers of writes)."""
    return [
        (
            f"writer CPU seconds ({WRITERS} processes)",
            lambda r: r.phases[phase].writer_cpu,
            ",.2f",
            better,
        ),
        (
            f"subscriber CPU seconds ({SUBSCRIBERS} processes)",
            lambda r: r.phases[phase].subscriber_cpu,
            ",.2f",
            better,
        ),
    ]


def report(args: argparse.Namespace, columns: list[Column]) -> None:
    constant = [
        ("writes sent", lambda r: r.phases[0].writes, ",.0f", ""),
        ("  of which changing asserts", lambda r: r.phases[0].counts[CHANGE], ",.0f", ""),
        ("  repeats of the stored state", lambda r: r.phases[0].counts[REPEAT], ",.0f", ""),
        ("  retracts", lambda r: r.phases[0].counts[RETRACT], ",.0f", ""),
        ("writes/s absorbed", lambda r: r.phases[0].rate, ",.0f", "up"),
        ("latest batch behind schedule (ms)", lambda r: r.phases[0].max_late_ms, ",.1f", "down"),
        *notification_rows(0, "down"),
        ("mirror latency p50 (ms)", lambda r: r.latency and r.latency.p50, ",.1f", "down"),
        ("mirror latency p99 (ms)", lambda r: r.latency and r.latency.p99, ",.1f", "down"),
        ("mirror latency p99.9 (ms)", lambda r: r.latency and r.latency.p999, ",.1f", "down"),
        ("mirror latency max (ms)", lambda r: r.latency and r.latency.max, ",.1f", "down"),
        (
            "  latency samples (writes x mirrors)",
            lambda r: r.latency and r.latency.samples,
            ",.0f",
            "",
        ),
        ("server CPU seconds", lambda r: r.phases[0].server_cpu, ",.2f", "down"),
        *client_cpu_rows(0, "down"),
    ]
    saturation = [
        ("writes/s absorbed", lambda r: r.phases[1].rate, ",.0f", "up"),
        ("writes absorbed", lambda r: r.phases[1].writes, ",.0f", ""),
        *notification_rows(1, ""),
        (
            "mirrors caught up after the last reply (s)",
            lambda r: r.phases[1].catch_up,
            ",.2f",
            "down",
        ),
        ("server CPU seconds", lambda r: r.phases[1].server_cpu, ",.2f", ""),
        (
            "  server CPU per write (us)",
            lambda r: r.phases[1].server_cpu / r.phases[1].writes * 1e6,
            ",.1f",
            "down",
        ),
        *client_cpu_rows(1, ""),
    ]
    resources = [
        ("server resident memory at the end (MiB)", lambda r: r.rss / 2**20, ",.1f", "down"),
        ("server peak resident memory (MiB)", lambda r: r.hwm / 2**20, ",.1f", "down"),
        ("alive entities at the end", lambda r: r.alive, ",.0f", ""),
    ]
    runs = max(len(c.runs) for c in columns)
    if runs > 1:
        print(f"\neach figure: the median of {runs} runs of each configuration")
    print_table(
        f"constant rate: {args.rate:,} writes/s offered for {args.seconds:g} s"
        f" (latency from the intended send time; first {WARMUP_S:g} s not counted)",
        constant,
        columns,
    )
    print_table(
        f"saturation: the writers as fast as the server takes them, {args.saturation_seconds:g} s",
        saturation,
        columns,
    )
    print_table("resources", resources, columns)
    if runs > 1:
        print("\nmirror latency p50 / p99 (ms) of each run")
        for column in columns:
            figures = ", ".join(
                f"{r.latency.p50:.1f} / {r.latency.p99:.1f}" if r.ok and r.latency else "-"
                for r in column.runs
            )
            print(f"  {column.name:<{column_width(columns)}}{figures}")
    print("\ncheck: the server's state against what the writers sent, each mirror against it")
    for column in columns:
        if column.ok:
            result = column.runs[-1]
            print(
                f"  {column.name}: OK in {len(column.runs)} run(s) ({SUBSCRIBERS} mirrors equal "
                f"the server's {result.alive:,} alive entities, whose sources and fields are "
                "what the writers left)"
            )
        for result in column.runs:
            if not result.ok:
                print(f"  {column.name}: WRONG ({len(result.problems)} problems); first ones:")
                for problem in result.problems[:8]:
                    print(f"    {problem}")
        exhausted = sum(r.phases[1].exhausted for r in column.runs)
        if exhausted:
            print(
                f"  {column.name}: {exhausted} times a writer sent its whole pool of pre-encoded "
                "batches and encoded more on the way (raise --pool-rate)"
            )
        latency = column.runs[0].latency if column.runs else None
        if latency and (latency.folded or latency.two_sources):
            print(
                f"  {column.name}: not in the latency figures (the same writes on both sides): "
                f"{latency.two_sources:,} changing writes to the entities two sources "
                f"assert, {latency.folded:,} that their own batch retracts afterwards"
            )
        unmatched = sum(r.latency.unmatched for r in column.runs if r.latency)
        if unmatched:
            print(
                f"  {column.name}: {unmatched:,} changing writes never seen by a mirror in a "
                "newer state (not in the latency figures)"
            )
    pairs = [(ours, theirs) for ours, theirs in comparisons(columns) if ours.ok and theirs.ok]
    if not pairs:
        return
    print(
        "\ntarget (issue 8): ConvergeDB absorbs >= 2x the writes/s of the Redis build, with a"
        " lower p99 mirror latency and fewer notifications for the same writes; all three at"
        " one window"
    )
    for ours, theirs in pairs:
        ratio = (ours.figure(lambda r: r.phases[1].rate) or 0.0) / (
            theirs.figure(lambda r: r.phases[1].rate) or 1.0
        )
        p99 = ours.figure(lambda r: r.latency.p99 if r.latency else None)
        redis_p99 = theirs.figure(lambda r: r.latency.p99 if r.latency else None)
        notified = ours.figure(lambda r: r.phases[0].notifications) or 0.0
        redis_notified = theirs.figure(lambda r: r.phases[0].notifications) or 0.0
        verdicts = [
            f"writes/s ratio {ratio:.2f} (>= {TARGET_RATIO:g}): "
            f"{'met' if ratio >= TARGET_RATIO else 'MISSED'}",
            f"notifications at the constant rate {notified:,.0f} vs {redis_notified:,.0f}: "
            f"{'met' if notified < redis_notified else 'MISSED'}",
        ]
        if p99 is not None and redis_p99 is not None:
            verdicts.insert(
                1,
                f"p99 {p99:.1f} ms vs {redis_p99:.1f} ms: {'met' if p99 < redis_p99 else 'MISSED'}",
            )
        print(f"  window {ours.window_ms} ms vs {theirs.name}: " + "; ".join(verdicts))


def failed_run(name: str, exc: Exception) -> SystemResult:
    return SystemResult(
        name,
        f"{name}: the run failed",
        [PhaseFigures(), PhaseFigures()],
        None,
        0,
        0,
        [f"the run failed: {exc!r}"],
        0,
        0,
        0.0,
    )


def windows(text: str) -> list[int]:
    """`--window-ms`: one window, or several separated by commas."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole milliseconds: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("each window must be at least 1 ms")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a window is given twice: {text!r}")
    return values


APPENDFSYNC = ("everysec", "always", "no")
"""Redis's AOF fsync policies."""


def fsync_policies(text: str) -> list[str]:
    """`--redis-appendfsync`: one policy, or several separated by commas."""
    values = text.split(",")
    unknown = [v for v in values if v not in APPENDFSYNC]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"not a policy: {', '.join(map(repr, unknown))} (choose from {', '.join(APPENDFSYNC)})"
        )
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"a policy given twice: {text!r}")
    return values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    parser.add_argument("--rate", type=int, default=5_000, help="writes/s offered (all writers)")
    parser.add_argument("--seconds", type=float, default=None, help="constant-rate phase (15; 4)")
    parser.add_argument("--saturation-seconds", type=float, default=None, help="(8; 3 quick)")
    parser.add_argument(
        "--pool-rate",
        type=int,
        default=120_000,
        help="writes/s the saturation phase's pre-encoded pool is sized for",
    )
    parser.add_argument(
        "--redis-appendfsync",
        type=fsync_policies,
        default=["everysec"],
        help="Redis's AOF fsync policy: everysec (the default, what most deployments run), "
        "always (every confirmed write fsync'd, as on ConvergeDB) or no; several, e.g. "
        "everysec,always: Redis runs under each, one column each, and the target is judged "
        "against each",
    )
    parser.add_argument("--only", choices=("cdb", "redis"), help="run one system only")
    parser.add_argument(
        "--window-ms",
        type=windows,
        default=[20],
        help="ConvergeDB's coalescing window (the default 20; shorter: lower latency, less "
        "coalescing); several, e.g. 20,2: ConvergeDB runs at each, side by side with the Redis "
        "runs, and the target is judged at each",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="runs of each configuration, one after the other in turn; figures are medians",
    )
    args = parser.parse_args()
    args.seconds = args.seconds or (4.0 if args.quick else 15.0)
    args.saturation_seconds = args.saturation_seconds or (3.0 if args.quick else 8.0)
    args.pool_batches = -(-int(args.pool_rate * args.saturation_seconds) // (WRITERS * BATCH))
    if args.seconds <= WARMUP_S:
        parser.error(f"--seconds must be above the {WARMUP_S:g} s warm-up")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    systems = ["cdb", "redis"] if args.only is None else [args.only]
    if "redis" in systems:
        args.redis_binary = ensure_redis_server()
    import redis

    print(__doc__.split("\n\n")[0])
    hiredis = " + hiredis" if redis.utils.HIREDIS_AVAILABLE else ""
    intro = {
        "workload": f"{WRITERS} writer processes (sources {', '.join(map(str, SOURCES))}), "
        f"{ENTITIES:,} entities of a 10-field kind, {HOT_SHARE:.0%} hot ({HOT_WRITES:.0%} of "
        f"the writes), every tenth entity also asserted by a second source; full-state asserts "
        f"({REPEAT_P:.0%} repeating the stored state) and {RETRACT_P:.0%} retracts; {BATCH} "
        f"writes per round trip, encoded before each phase's clock starts; {SUBSCRIBERS} "
        "subscriber processes each keeping a mirror of the kind",
        "ConvergeDB": f"`convergedb serve` ({source_state()}), window "
        f"{', '.join(map(str, args.window_ms))} ms, fsync every flush; SDK writers "
        "(client.batch) and Mirror subscribers",
        "Redis": "a hash per entity, a Lua script per write (EVALSHA: source set, version, "
        # several policies: "appendfsync everysec or always", one column each
        f"dedup, tombstone), PUBLISH; {describe_settings(' or '.join(args.redis_appendfsync))}; "
        f"redis-py {redis.__version__}{hiredis} writers (pipelines) and subscribers "
        "(SUBSCRIBE, SCAN + HGETALL bootstrap)",
    }
    for label, text in intro.items():
        print(
            textwrap.fill(
                text,
                100,
                initial_indent=f"{label + ':':<12}",
                subsequent_indent=" " * 12,
                break_on_hyphens=False,
            )
        )
    columns = [Column("cdb", window_ms=window) for window in args.window_ms if "cdb" in systems]
    columns += [
        Column("redis", appendfsync=policy)
        for policy in args.redis_appendfsync
        if "redis" in systems
    ]
    for run in range(args.runs):
        for column in columns:
            of = f" (run {run + 1} of {args.runs})" if args.runs > 1 else ""
            what = "ConvergeDB" if column.system == "cdb" else "Redis"
            print(f"\nrunning {what}, {column.setting}{of} ...", flush=True)
            with tempfile.TemporaryDirectory(prefix=f"cdb-vs-redis-{column.system}-") as tmp:
                try:
                    result = run_system(column, args, Path(tmp))
                except Exception as exc:  # that side has no figure; the other one still runs
                    traceback.print_exc()
                    result = failed_run(column.name, exc)
            print(
                f"  {result.description}: done in {result.seconds:.0f} s; the mirrors "
                f"bootstrapped {result.bootstrap:,} entities",
                flush=True,
            )
            column.runs.append(result)
    report(args, columns)
    if not all(c.ok for c in columns):
        sys.exit(1)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
