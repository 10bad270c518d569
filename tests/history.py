"""Recorded histories of a run, and the checks of the subscription guarantees.

A test records every write it sends (`WriteLog`; each gets the flush seq of the SYNC that
confirmed it), every item each subscriber receives (`SubscriberLog`, one per subscription) and
every state it reads with QUERY. `History.check` then checks the watch guarantees, named as
etcd names them:

- **ordered**: per subscriber, live notifications never go back in seq, and per entity their
  versions only go up, across reconnections too. (Bootstrap frames may repeat an older state:
  SPEC §8 has consumers keep the highest version.)
- **atomic**: the changes of one flush share a seq and arrive together: they are contiguous in
  each subscriber's stream, and a subscriber that received any change of a flush received every
  change of it that any subscriber saw, except where the specification allows less: the last
  flush before a lost connection (cut), and a change that was merged into a later change of the
  same entity for a held or backed-up subscriber (or cancelled: created then deleted unseen). A
  live deletion that interleaves with a delta bootstrap counts as received, though it is
  recorded as one of the delta's tombstones (on the wire the two look alike).
- **reliable**: one state per (entity, version) across every subscriber and every query, so no
  subscriber saw a state the server does not have; every state is one the writers produced (a
  test-supplied check); a write confirmed by SYNC at seq S shows in every state notified at a seq
  of S or later; and each subscriber ends equal to the server's final state, read by QUERY
  (except a LIVE_ONLY subscription that reconnected: it does not catch up, by definition).
- **resumable**: every subscriber that reconnected with RESUME got a bootstrap back (a delta when
  nothing was compacted) and ends equal to the server too.

Entities are assumed never re-created after their tombstone was compacted (the version would
start again at 1); the workloads that compact never re-create.

The records and the checks do no I/O, so their rules are easy to read and to test. The section
at the end records a live run through the SDK (`Watcher`, `query`, `converge`), for the suites
that run one: crash torture and network faults.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from convergedb import (
    BootstrapComplete,
    BootstrapMode,
    BootstrapStarted,
    Change,
    ChangeType,
    KindHandle,
    QueryStatus,
    ReconnectMode,
    Resubscribed,
    Subscription,
    id_from_int,
)

Key = tuple[str, bytes]
"""An entity: (kind name, 32-byte entity id)."""

StateCheck = Callable[[Key, Any, bytes | None], str | None]
"""`(key, value, meta)` -> a complaint, or None when the writers could have produced the value.
`meta` is the notification's metadata for live changes, None for bootstrap frames and queries."""

Contribution = Callable[[Key, Any, int], int | None]
"""`(key, value, writer)` -> the counter that `writer` last wrote into this state, or None."""

MAX_REPORTED = 12
"""Violations listed per guarantee in a failure message."""


# --- writes -----------------------------------------------------------------------------------


class Op(enum.Enum):
    """A write, as the test sent it (or as the server synthesises it at an epoch end)."""

    ASSERT = "assert"
    PATCH = "patch"
    RETRACT = "retract"
    EPOCH_RETRACT = "epoch-retract"

    @property
    def asserts(self) -> bool:
        """Whether the write sets its source's bit."""
        return self in (Op.ASSERT, Op.PATCH)


@dataclass(slots=True)
class Write:
    """One write sent by a writer. `seq` is the flush seq its SYNC answered (None until a SYNC
    confirmed it; it stays None when the connection was lost first)."""

    index: int
    writer: int
    key: Key
    op: Op
    value: int
    seq: int | None = None


class WriteLog:
    """Every write the test sent, in order, with the SYNC seqs that confirmed them."""

    def __init__(self) -> None:
        self.writes: list[Write] = []
        self._sent: dict[tuple[Key, int], set[int]] = defaultdict(set)

    def record(self, writer: int, key: Key, op: Op, value: int = 0) -> Write:
        """Record a write about to be sent."""
        write = Write(len(self.writes), writer, key, op, value)
        self.writes.append(write)
        if op.asserts:
            self._sent[(key, writer)].add(value)
        return write

    @staticmethod
    def confirm(writes: Iterable[Write], seq: int) -> None:
        """A SYNC answered `seq` after these writes: they are durable, in flush `seq` or earlier."""
        for write in writes:
            write.seq = seq

    def sent_values(self, key: Key, writer: int) -> set[int]:
        """Every value `writer` asserted or patched into `key` (confirmed or not)."""
        return self._sent.get((key, writer), set())

    @property
    def confirmed(self) -> list[Write]:
        return [w for w in self.writes if w.seq is not None]


# --- what subscribers saw ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class State:
    """An entity's state at a version: `value` None is a tombstone."""

    version: int
    value: Any


@dataclass(frozen=True, slots=True)
class Seen:
    """One notification a subscriber received.

    `live` is False for bootstrap frames, and for DELETED frames inside a delta bootstrap (the
    tombstones a delta sends look like live deletions on the wire).
    """

    subscriber: str
    session: int
    key: Key
    change: ChangeType
    version: int
    seq: int
    value: Any
    source_set: int
    meta: bytes
    cause: int | None
    live: bool


@dataclass(slots=True)
class Session:
    """A subscription on one connection: the first, then one per reconnection."""

    number: int
    resumed: ReconnectMode | None
    """How it was re-established (None for the first session)."""
    bootstraps: list[BootstrapMode] = field(default_factory=list)
    completed: int = 0
    frames: list[Seen] = field(default_factory=list)
    cut: bool = False
    """Ended by a lost connection (another session followed)."""

    @property
    def live(self) -> list[Seen]:
        return [f for f in self.frames if f.live]


class View:
    """What a subscriber knows, built by the rules every consumer follows (SPEC §8).

    The highest version wins. A live deletion forgets the entity (after compaction an entity
    may be created again at version 1, and live changes come in order); during a bootstrap the
    deletions are remembered until it ends, since bootstrap frames may be older than live ones.
    A FULL bootstrap is authoritative: during it a frame beats what was held from before it, and
    when it completes, the entities it did not mention are gone.
    """

    def __init__(self) -> None:
        self.entries: dict[Key, State] = {}
        self.bootstrap: BootstrapMode | None = None
        self._fresh: set[Key] = set()

    def begin(self, mode: BootstrapMode) -> None:
        self.abandon()
        self.bootstrap = mode

    def complete(self) -> None:
        if self.bootstrap is BootstrapMode.FULL:
            for key in [k for k in self.entries if k not in self._fresh]:
                del self.entries[key]
        self.abandon()

    def abandon(self) -> None:
        self.bootstrap = None
        self._fresh = set()
        for key in [k for k, state in self.entries.items() if state.value is None]:
            del self.entries[key]

    def apply(self, seen: Seen) -> None:
        held = self.entries.get(seen.key)
        authoritative = self.bootstrap is BootstrapMode.FULL and seen.key not in self._fresh
        if held is not None and held.version >= seen.version and not authoritative:
            return
        if self.bootstrap is not None:
            self._fresh.add(seen.key)
            self.entries[seen.key] = State(seen.version, seen.value)
        elif seen.value is None:
            self.entries.pop(seen.key, None)
        else:
            self.entries[seen.key] = State(seen.version, seen.value)

    def alive(self) -> dict[Key, State]:
        return {key: state for key, state in self.entries.items() if state.value is not None}


class SubscriberLog:
    """Every item one subscription yielded, split into sessions, and the view it builds."""

    def __init__(
        self, name: str, kind: str, mode: ReconnectMode, max_versions: dict[Key, int]
    ) -> None:
        self.name = name
        self.kind = kind
        self.mode = mode
        self.sessions = [Session(0, None)]
        self.view = View()
        self.items = 0
        self._max_versions = max_versions

    def __repr__(self) -> str:
        return f"<SubscriberLog {self.name} {self.mode.name} sessions={len(self.sessions)}>"

    @property
    def session(self) -> Session:
        return self.sessions[-1]

    @property
    def bootstrapping(self) -> bool:
        return self.view.bootstrap is not None

    @property
    def frames(self) -> Iterator[Seen]:
        for session in self.sessions:
            yield from session.frames

    def record(self, item: Any) -> None:
        """Record one item of the subscription (a `Change`, a bootstrap marker, `Resubscribed`)."""
        self.items += 1
        if isinstance(item, Change):
            self._change(item)
        elif isinstance(item, BootstrapStarted):
            self.session.bootstraps.append(item.mode)
            self.view.begin(item.mode)
        elif isinstance(item, BootstrapComplete):
            self.session.completed += 1
            self.view.complete()
        elif isinstance(item, Resubscribed):
            self.session.cut = True
            self.sessions.append(Session(len(self.sessions), item.mode))
            self.view.abandon()
        else:
            raise AssertionError(f"{self.name}: unexpected item {item!r}")

    def _change(self, change: Change[Any]) -> None:
        deleted = change.type is ChangeType.DELETED
        bootstrap = change.type is ChangeType.BOOTSTRAP or (
            deleted and self.view.bootstrap is BootstrapMode.DELTA
        )
        key = (self.kind, bytes(change.entity_id))
        seen = Seen(
            self.name,
            self.session.number,
            key,
            change.type,
            change.version,
            change.seq,
            None if deleted else change.value,
            change.source_set,
            change.meta,
            None if change.cause is None else int(change.cause),
            not bootstrap,
        )
        self.session.frames.append(seen)
        self.view.apply(seen)
        if change.version > self._max_versions.get(key, 0):
            self._max_versions[key] = change.version


# --- the history and its checks ---------------------------------------------------------------


@dataclass
class Report:
    """The violations of each guarantee, and figures about what was checked."""

    ordered: list[str] = field(default_factory=list)
    atomic: list[str] = field(default_factory=list)
    reliable: list[str] = field(default_factory=list)
    resumable: list[str] = field(default_factory=list)
    figures: dict[str, int] = field(default_factory=dict)

    def violations(self) -> dict[str, list[str]]:
        return {
            "ordered": self.ordered,
            "atomic": self.atomic,
            "reliable": self.reliable,
            "resumable": self.resumable,
        }

    def assert_holds(self) -> None:
        """Raise AssertionError naming every guarantee that was broken (with examples)."""
        broken = {name: found for name, found in self.violations().items() if found}
        if not broken:
            return
        lines = []
        for name, found in broken.items():
            lines.append(f"{name}: {len(found)} violations")
            lines.extend(f"  {line}" for line in found[:MAX_REPORTED])
        raise AssertionError("subscription guarantees broken:\n" + "\n".join(lines))

    def summary(self) -> str:
        held = ", ".join(
            f"{name} {'ok' if not v else 'BROKEN'}" for name, v in self.violations().items()
        )
        figures = ", ".join(f"{name} {value}" for name, value in self.figures.items())
        return f"{held} ({figures})"


class History:
    """Writes, notifications and query results of one run."""

    def __init__(self) -> None:
        self.writes = WriteLog()
        self.subscribers: list[SubscriberLog] = []
        self.queries: list[tuple[Key, State | None]] = []
        self.max_versions: dict[Key, int] = {}
        """The highest version anyone observed per entity (notifications and queries)."""

    def subscriber(self, name: str, kind: str, mode: ReconnectMode) -> SubscriberLog:
        """A new log for one subscription of `kind`."""
        log = SubscriberLog(name, kind, mode, self.max_versions)
        self.subscribers.append(log)
        return log

    def observe_query(self, key: Key, state: State | None) -> None:
        """Record a QUERY result: a state (value None for a tombstone) or None (not found)."""
        self.queries.append((key, state))
        if state is not None and state.version > self.max_versions.get(key, 0):
            self.max_versions[key] = state.version

    def check(
        self,
        final: dict[Key, State],
        *,
        state_ok: StateCheck,
        contribution: Contribution,
        delta_resumes: bool,
    ) -> Report:
        """Check every guarantee. `final` is the server's final state of every alive entity of
        the subscribed kinds (read by QUERY once the writes stopped); `delta_resumes` says
        whether every RESUME must have been answered with a delta (nothing was compacted)."""
        report = Report()
        for log in self.subscribers:
            report.ordered += check_ordered(log)
        report.atomic = check_atomic(self.subscribers)
        report.reliable = (
            check_one_state_per_version(self)
            + check_states(self, state_ok)
            + check_confirmed_writes(self, contribution)
            + check_final_views(self.subscribers, final)
        )
        report.resumable = check_resumable(self.subscribers, final, delta_resumes=delta_resumes)
        frames = [f for log in self.subscribers for f in log.frames]
        report.figures = {
            "writes": len(self.writes.writes),
            "confirmed": len(self.writes.confirmed),
            "notifications": len(frames),
            "live": sum(1 for f in frames if f.live),
            "sessions": sum(len(log.sessions) for log in self.subscribers),
            "delta resumes": count_resumes(self.subscribers, BootstrapMode.DELTA),
            "full resumes": count_resumes(self.subscribers, BootstrapMode.FULL),
            "queries": len(self.queries),
        }
        return report


def count_resumes(logs: Iterable[SubscriberLog], mode: BootstrapMode) -> int:
    """Reconnected sessions of RESUME subscribers whose bootstrap was of `mode`."""
    return sum(
        1
        for log in logs
        for session in log.sessions
        if session.resumed is ReconnectMode.RESUME and session.bootstraps[:1] == [mode]
    )


def check_ordered(log: SubscriberLog) -> list[str]:
    """Live notifications: seqs never go back; per entity, versions only go up."""
    found = []
    last_seq = 0
    versions: dict[Key, int] = {}
    for seen in log.frames:
        if not seen.live:
            continue
        if seen.seq < last_seq:
            found.append(f"{log.name}: seq went back from {last_seq} to {seen.seq} ({_who(seen)})")
        last_seq = max(last_seq, seen.seq)
        before = versions.get(seen.key)
        if before is not None and seen.version <= before:
            found.append(f"{log.name}: version {seen.version} after {before} ({_who(seen)})")
        versions[seen.key] = seen.version
    return found


def check_atomic(logs: list[SubscriberLog]) -> list[str]:
    """The changes of one flush are contiguous in each stream and arrive together."""
    flushes: dict[tuple[str, int], dict[bytes, ChangeType]] = defaultdict(dict)
    changed_at: dict[Key, list[int]] = defaultdict(list)
    deleted_at: dict[Key, list[int]] = defaultdict(list)
    for log in logs:
        for seen in log.frames:
            changed_at[seen.key].append(seen.seq)
            if seen.value is None:
                deleted_at[seen.key].append(seen.seq)
            if seen.live:
                flushes[(log.kind, seen.seq)].setdefault(seen.key[1], seen.change)
    found = []
    for log in logs:
        for session in log.sessions:
            found += _contiguous(log, session)
            found += _complete(log, session, flushes, changed_at, deleted_at)
    return found


def _contiguous(log: SubscriberLog, session: Session) -> list[str]:
    """No live frame of a flush comes after a frame of a later flush in the same session."""
    found = []
    done: set[int] = set()
    current: int | None = None
    for seen in session.live:
        if seen.seq == current:
            continue
        if seen.seq in done:
            found.append(
                f"{log.name} session {session.number}: flush {seen.seq} split by flush {current} "
                f"({_who(seen)})"
            )
        if current is not None:
            done.add(current)
        current = seen.seq
    return found


def _complete(
    log: SubscriberLog,
    session: Session,
    flushes: dict[tuple[str, int], dict[bytes, ChangeType]],
    changed_at: dict[Key, list[int]],
    deleted_at: dict[Key, list[int]],
) -> list[str]:
    """A session that received any change of a flush received all of them (see the module doc
    for what the specification excuses)."""
    live = session.live
    if not live:
        return []
    last = live[-1].seq
    received: dict[int, set[bytes]] = defaultdict(set)
    for seen in live:
        received[seen.seq].add(seen.key[1])
    in_session: dict[Key, list[int]] = defaultdict(list)
    for seen in session.frames:
        in_session[seen.key].append(seen.seq)
    found = []
    for seq, got in received.items():
        for eid, change in flushes[(log.kind, seq)].items():
            if eid in got:
                continue
            key = (log.kind, eid)
            # a live deletion that arrives while a delta bootstrap is under way looks like one
            # of the delta's tombstones on the wire (so it is recorded as not live): received
            delivered = seq in in_session.get(key, ())
            merged = any(s > seq for s in in_session.get(key, ()))
            cut = session.cut and (
                seq == last or any(s > seq and s >= last for s in changed_at[key])
            )
            cancelled = change is ChangeType.CREATED and any(s > seq for s in deleted_at[key])
            if not (delivered or merged or cut or cancelled):
                found.append(
                    f"{log.name} session {session.number}: flush {seq} arrived without its "
                    f"change of {eid.hex()[:16]} ({change.name}), which others received"
                )
    return found


def check_one_state_per_version(history: History) -> list[str]:
    """Every observation of (entity, version) shows the same state: nobody saw a state the
    server does not have (a lost flush whose version was reused would show here)."""
    found = []
    states: dict[tuple[Key, int], tuple[Any, int | None, str]] = {}
    for log in history.subscribers:
        for seen in log.frames:
            where = f"{seen.subscriber} seq {seen.seq}"
            found += _same_state(states, seen.key, seen.version, seen.value, seen.cause, where)
    for key, state in history.queries:
        if state is not None:
            found += _same_state(states, key, state.version, state.value, None, "a query")
    return found


def _same_state(
    states: dict[tuple[Key, int], tuple[Any, int | None, str]],
    key: Key,
    version: int,
    value: Any,
    cause: int | None,
    where: str,
) -> list[str]:
    known = states.get((key, version))
    if known is None:
        states[(key, version)] = (value, cause, where)
        return []
    known_value, known_cause, known_where = known
    same_cause = cause is None or known_cause is None or cause == known_cause
    if known_value == value and same_cause:
        if known_cause is None and cause is not None:
            states[(key, version)] = (value, cause, where)
        return []
    return [
        f"{key[0]} {key[1].hex()[:16]} v{version}: {where} has {value!r} (cause {cause}) but "
        f"{known_where} had {known_value!r} (cause {known_cause})"
    ]


def check_states(history: History, state_ok: StateCheck) -> list[str]:
    """Every alive state anyone observed is one the writers produced."""
    found = []
    for log in history.subscribers:
        for seen in log.frames:
            if seen.value is not None:
                complaint = state_ok(seen.key, seen.value, seen.meta if seen.live else None)
                if complaint:
                    found.append(f"{_who(seen)}: {complaint}")
    for key, state in history.queries:
        if state is not None and state.value is not None:
            complaint = state_ok(key, state.value, None)
            if complaint:
                found.append(f"query of {key[1].hex()[:16]} v{state.version}: {complaint}")
    return found


def check_confirmed_writes(history: History, contribution: Contribution) -> list[str]:
    """A write confirmed by SYNC at seq S shows in every state notified at seq >= S that its
    writer still asserts (writers write increasing counters, so 'shows' means >=)."""
    floors: dict[tuple[Key, int], tuple[list[int], list[int]]] = {}
    by_key: dict[tuple[Key, int], list[tuple[int, int]]] = defaultdict(list)
    for write in history.writes.confirmed:
        if write.op.asserts and write.seq is not None:
            by_key[(write.key, write.writer)].append((write.seq, write.value))
    for where, confirmed in by_key.items():
        confirmed.sort()
        seqs, highest, top = [], [], 0
        for seq, value in confirmed:
            top = max(top, value)
            seqs.append(seq)
            highest.append(top)
        floors[where] = (seqs, highest)
    found = []
    for log in history.subscribers:
        for seen in log.frames:
            if seen.value is None:
                continue
            for writer in _bits(seen.source_set):
                floor = floors.get((seen.key, writer))
                if floor is None:
                    continue
                at = bisect.bisect_right(floor[0], seen.seq)
                if not at:
                    continue
                wanted = floor[1][at - 1]
                has = contribution(seen.key, seen.value, writer)
                if has is None or has < wanted:
                    found.append(
                        f"{_who(seen)}: writer {writer}'s value {has} is older than {wanted}, "
                        f"confirmed by SYNC at seq <= {seen.seq}"
                    )
    return found


def check_final_views(logs: Iterable[SubscriberLog], final: dict[Key, State]) -> list[str]:
    """Each subscriber ends with exactly the server's alive entities of its kind."""
    found = []
    for log in logs:
        found += _view_differences(log, final)
    return found


def _view_differences(log: SubscriberLog, final: dict[Key, State]) -> list[str]:
    if log.mode is ReconnectMode.LIVE_ONLY and len(log.sessions) > 1:
        return []  # it reconnected, and LIVE_ONLY does not catch up on what it missed
    return view_differences(log.name, log.kind, log.view, final)


def view_differences(name: str, kind: str, view: View, final: dict[Key, State]) -> list[str]:
    """How a subscriber's view of `kind` differs from the server's alive entities (`final`)."""
    expected = {key: state for key, state in final.items() if key[0] == kind}
    got = view.alive()
    found = []
    for key in sorted(expected.keys() | got.keys()):
        want, have = expected.get(key), got.get(key)
        if want != have:
            found.append(f"{name} ends with {key[1].hex()[:16]} = {have}, server has {want}")
    return found


def views_equal(logs: Iterable[SubscriberLog], final: dict[Key, State]) -> bool:
    """Whether every subscriber's view equals the server's final state (for waiting on it)."""
    return all(not _view_differences(log, final) for log in logs)


def check_resumable(
    logs: Iterable[SubscriberLog], final: dict[Key, State], *, delta_resumes: bool
) -> list[str]:
    """RESUME subscribers got a bootstrap after each reconnection (a delta when nothing was
    compacted) and end equal to the server."""
    found = []
    for log in logs:
        if log.mode is not ReconnectMode.RESUME:
            continue
        for session in log.sessions:
            if session.resumed is None:
                continue
            if not session.bootstraps and not session.cut:
                found.append(f"{log.name} session {session.number}: resumed with no bootstrap")
            if delta_resumes and session.bootstraps[:1] == [BootstrapMode.FULL]:
                found.append(
                    f"{log.name} session {session.number}: RESUME answered with a FULL "
                    "bootstrap though nothing was compacted (the server lost seqs?)"
                )
        found += _view_differences(log, final)
    return found


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _who(seen: Seen) -> str:
    return (
        f"{seen.change.name} {seen.key[1].hex()[:16]} v{seen.version} seq {seen.seq} "
        f"session {seen.session}"
    )


# --- recording a live run ---------------------------------------------------------------------


def key(kind: str, entity: int) -> Key:
    """The entity `entity` (an int id) of `kind`."""
    return (kind, id_from_int(entity))


async def eventually(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Wait until `check()` holds, asking again every 50 ms, or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)


@dataclass
class Found:
    """A QUERY result in the form the checks use."""

    status: QueryStatus
    version: int
    source_set: int
    value: Any

    @property
    def state(self) -> State | None:
        if self.status is QueryStatus.NOT_FOUND:
            return None
        return State(self.version, self.value if self.status is QueryStatus.ALIVE else None)


async def query(history: History, handle: KindHandle[Any], ids: Iterable[int]) -> dict[int, Found]:
    """QUERY every id (concurrently), recording each result in the history."""
    ids = list(ids)
    results = await asyncio.gather(*(handle.query(i) for i in ids))
    found = {}
    for i, result in zip(ids, results, strict=True):
        found[i] = Found(result.status, result.version, result.source_set, result.value)
        history.observe_query(key(handle.name, i), found[i].state)
    return found


def alive_states(kind: str, found: dict[int, Found]) -> dict[Key, State]:
    """The alive entities among QUERY results, as `History.check` takes the final state."""
    return {
        key(kind, entity): State(result.version, result.value)
        for entity, result in found.items()
        if result.status is QueryStatus.ALIVE
    }


class Watcher:
    """A subscription to one kind, recording every item it yields into its log."""

    def __init__(self, log: SubscriberLog) -> None:
        self.log = log
        self.subscription: Subscription[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(
        self, handle: KindHandle[Any], *, include_previous: bool = False, bootstrap: bool = True
    ) -> None:
        """Subscribe (returns once the server accepted) and record in the background."""
        self.subscription = handle.subscribe(
            mode=self.log.mode, include_previous=include_previous, bootstrap=bootstrap
        )
        await self.subscription.start()
        self._task = asyncio.create_task(self._consume(self.subscription))

    async def _consume(self, subscription: Subscription[Any]) -> None:
        async for item in subscription:
            self.log.record(item)

    @property
    def settled(self) -> bool:
        """Nothing queued, no bootstrap under way, the consumer alive."""
        assert self._task is not None and self.subscription is not None
        if self._task.done():
            self._task.result()  # raises what the consumer died of
            raise AssertionError(f"{self.log.name} stopped consuming")
        return not self.subscription.pending and not self.log.bootstrapping

    async def close(self) -> None:
        if self.subscription is not None:
            await self.subscription.close()
        if self._task is not None:
            await self._task


async def converge(watchers: list[Watcher], final: dict[Key, State], timeout: float) -> None:
    """Wait until every watcher's view equals the server's final state (its differences are
    listed when it does not within `timeout` s)."""
    logs = [w.log for w in watchers]

    async def equal() -> bool:
        return all(w.settled for w in watchers) and views_equal(logs, final)

    try:
        await eventually("the subscribers reach the server's state", equal, timeout)
    except AssertionError as exc:
        differences = check_final_views(logs, final)
        raise AssertionError(f"{exc}\n" + "\n".join(differences[:20])) from None


# --- histories made by hand, for the tests of the checks -------------------------------------


def change(kind: ChangeType, entity: int, version: int, seq: int, value: Any = 1) -> Any:
    """A notification of entity `entity` of kind "k" (source set 1)."""
    deleted = kind is ChangeType.DELETED
    return Change(kind, id_from_int(entity), None if deleted else value, version, 1, 1, seq)


def recorded(
    history: History, name: str, *items: Any, mode: ReconnectMode = ReconnectMode.RESUME
) -> SubscriberLog:
    """A subscriber of kind "k" that received `items`."""
    log = history.subscriber(name, "k", mode)
    for item in items:
        log.record(item)
    return log


def checked(history: History, final: dict[Key, State], *, delta: bool = True) -> Report:
    """The report on a history whose every state and contribution passes."""
    return history.check(
        final, state_ok=lambda *_: None, contribution=lambda *_: None, delta_resumes=delta
    )
