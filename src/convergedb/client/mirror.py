"""A local, always up-to-date copy of a kind, kept from a subscription.

    async with cdb.Mirror(players) as mirror:
        await mirror.wait_synced()          # the first bootstrap is complete
        print(len(mirror), mirror.get("player:ana"))

What most subscribers write by hand, once: a dict `entity_id -> MirrorEntry(version, value,
source_set)` fed by `handle.subscribe()`, with the rules that make it converge to the server's
state whatever the interleaving:

- the highest version wins: a change older than what the mirror holds is ignored (live changes
  and bootstrap frames may interleave, and an entity may arrive twice);
- DELETED removes the entity;
- a FULL bootstrap (the first one, a re-bootstrap in `ReconnectMode.FULL`, or a RESUME that the
  server answered with a full bootstrap) is authoritative: it replaces what the mirror held from
  before it, and when it completes, the entities it did not send (and no live change mentioned
  meanwhile) are dropped, because a full bootstrap means "any entity not sent does not exist".

The mirror's versions and values are exact; its source sets are those of each entity's last
notification: a change of the source set alone (a second source asserting identical data, or one
of two sources retracting) bumps no version and sends no notification (SPEC §4). Query the
entity when the exact set of sources matters.

The mirror is a plain in-memory dict read from the event loop's thread; reading it never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from ..ids import EntityId
from ..ids import entity_id as make_entity_id
from .handle import EntityKey, KindHandle
from .reconnect import ReconnectMode
from .subscription import (
    DEFAULT_MAX_QUEUE,
    BootstrapComplete,
    BootstrapStarted,
    Change,
    Resubscribed,
    Subscription,
    SubscriptionItem,
)

T = TypeVar("T")

ChangeCallback = Callable[[Change[T]], None]
"""Called with each change the mirror applied (not with the ones it ignored as stale)."""


@dataclass(frozen=True, slots=True)
class MirrorEntry(Generic[T]):
    """One entity as the mirror holds it: its version, value, and source set (as of its last
    notification: see the module documentation)."""

    version: int
    value: T
    source_set: int


class Mirror(Generic[T]):
    """A local copy of one kind, kept up to date by a subscription (see the module doc).

    Use `async with Mirror(handle) as m:` (or `await m.start()` / `await m.close()`) to run
    the subscription in a task; or make one without starting it and feed it the items of your
    own subscription with `apply`. `mode` is the subscription's `ReconnectMode` (RESUME by
    default, which keeps the mirror exact across reconnections at the cost of a delta).
    """

    def __init__(
        self,
        handle: KindHandle[T],
        *,
        mode: ReconnectMode = ReconnectMode.RESUME,
        on_change: ChangeCallback[T] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        self.handle = handle
        """The kind mirrored."""
        self.mode = mode
        """How the subscription is re-established after a reconnection."""
        self.on_change = on_change
        """Called with each change applied (from the mirror's task; keep it quick)."""
        self._max_queue = max_queue
        self._entries: dict[EntityId, MirrorEntry[T]] = {}
        self._seq = 0
        self._synced = asyncio.Event()
        self._progress = asyncio.Event()
        self._full_bootstrap = False
        self._in_bootstrap = False
        self._fresh: set[EntityId] = set()
        self._tombstones: dict[EntityId, int] = {}
        self._subscription: Subscription[T] | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._applied = 0
        self.bootstraps = 0
        """How many bootstraps completed (1 after the first sync)."""

    def __repr__(self) -> str:
        state = "ready" if self.ready else "syncing"
        return f"<Mirror {self.handle.name!r} {len(self)} entities, {state}, seq={self._seq}>"

    # --- reading --------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the first bootstrap is complete (the mirror holds the whole kind)."""
        return self._synced.is_set()

    @property
    def bootstrapping(self) -> bool:
        """Whether a bootstrap is being received (the first one, or one after a reconnection)."""
        return self._in_bootstrap

    @property
    def seq(self) -> int:
        """The highest seq among the changes applied, or the seq the server had committed when
        the subscription started, whichever is higher."""
        return self._seq

    @property
    def error(self) -> BaseException | None:
        """Why the mirror's subscription ended, if it ended with an error."""
        return self._error

    def __len__(self) -> int:
        """The number of alive entities held."""
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Whether an entity (any `EntityKey`) is held."""
        try:
            return make_entity_id(key) in self._entries  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[EntityId]:
        """The ids of the entities held."""
        return iter(list(self._entries))

    def get(self, key: EntityKey) -> T | None:
        """The value of an entity, or None if the mirror does not hold it."""
        entry = self._entries.get(make_entity_id(key))
        return None if entry is None else entry.value

    def entry(self, key: EntityKey) -> MirrorEntry[T] | None:
        """The version, value and source set of an entity, or None."""
        return self._entries.get(make_entity_id(key))

    def items(self) -> list[tuple[EntityId, T]]:
        """(entity id, value) of every entity held (a snapshot)."""
        return [(eid, entry.value) for eid, entry in self._entries.items()]

    def entries(self) -> dict[EntityId, MirrorEntry[T]]:
        """A snapshot of the whole mirror: entity id -> `MirrorEntry`."""
        return dict(self._entries)

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the first bootstrap is complete (at once if it is).

        Raises the subscription's error if it ended before, `TimeoutError` after `timeout`.
        """
        async with asyncio.timeout(timeout):
            await self._wait_until(self._synced.is_set)

    async def wait_seq(self, seq: int, timeout: float | None = None) -> None:
        """Wait until the mirror reflects every change up to flush `seq` — e.g. the seq a
        writer's `sync()` returned after writing to this kind: then the mirror equals the
        server's state as of that flush (or later).

        The mirror waits until it is in sync and has applied a change of `seq` or later, then
        sends a PING on its client's connection and applies everything the server sent before
        the PONG, so that the rest of the flush (its changes share one seq) is applied too.
        Only changes of this kind move the mirror's seq: wait for a seq that a change of this
        kind carried (or one at most the subscription's start).
        """
        async with asyncio.timeout(timeout):
            await self._wait_until(
                lambda: self._synced.is_set() and not self._in_bootstrap and self._seq >= seq
            )
            subscription = self._subscription
            if subscription is None:
                return  # fed by hand: nothing more is known
            await self.handle.client.ping()
            received = subscription.received
            await self._wait_until(lambda: self._applied >= received)

    async def _wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._raise_if_ended()
            self._progress.clear()
            await self._progress.wait()

    def _raise_if_ended(self) -> None:
        if self._error is not None:
            raise self._error
        if self._task is not None and self._task.done():
            raise RuntimeError("the mirror's subscription ended")

    # --- running --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe (with bootstrap) and apply the items in a background task.

        Raises what `subscribe` raises (e.g. `ConnectionLost`, `UnknownKind`).
        """
        if self._subscription is not None:
            return
        subscription = self.handle.subscribe(
            bootstrap=True, mode=self.mode, max_queue=self._max_queue
        )
        await subscription.start()
        self._subscription = subscription
        self._seq = max(self._seq, subscription.accepted_seq)
        self._applied = 0
        self._task = asyncio.get_running_loop().create_task(
            self._run(subscription), name=f"convergedb-mirror-{self.handle.name}"
        )

    async def close(self) -> None:
        """Unsubscribe and stop the task; the mirror keeps its last content. Idempotent."""
        if self._subscription is not None:
            await self._subscription.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def __aenter__(self) -> Mirror[T]:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self, subscription: Subscription[T]) -> None:
        try:
            async for item in subscription:
                self.apply(item)
                self._applied += 1
        except Exception as exc:
            self._error = exc
        finally:
            self._progress.set()

    # --- applying -------------------------------------------------------------------------------

    def apply(self, item: SubscriptionItem[T]) -> None:
        """Apply one item of a subscription of the kind (what the mirror's task does)."""
        if isinstance(item, Change):
            self._apply_change(item)
        elif isinstance(item, BootstrapStarted):
            self._begin_bootstrap(item)
        elif isinstance(item, BootstrapComplete):
            self._complete_bootstrap(item)
        elif isinstance(item, Resubscribed):
            self._abandon_bootstrap()
        self._progress.set()

    def _apply_change(self, change: Change[T]) -> None:
        self._seq = max(self._seq, change.seq)
        eid = change.entity_id
        if not self._is_newer(eid, change.version):
            return
        if self._in_bootstrap:
            self._fresh.add(eid)
        if change.deleted or change.value is None:
            self._entries.pop(eid, None)
            if self._in_bootstrap:
                self._tombstones[eid] = change.version
        else:
            self._entries[eid] = MirrorEntry(change.version, change.value, change.source_set)
            self._tombstones.pop(eid, None)
        if self.on_change is not None:
            self.on_change(change)

    def _is_newer(self, eid: EntityId, version: int) -> bool:
        """Whether a change at `version` beats what the mirror knows of the entity. During a
        full bootstrap, only what arrived since the bootstrap began counts."""
        if self._full_bootstrap and eid not in self._fresh:
            return True
        held = self._entries.get(eid)
        if held is not None and held.version >= version:
            return False
        dead = self._tombstones.get(eid)
        return dead is None or dead < version

    def _begin_bootstrap(self, started: BootstrapStarted) -> None:
        self._in_bootstrap = True
        self._full_bootstrap = started.full
        self._fresh = set()
        self._tombstones = {}

    def _complete_bootstrap(self, complete: BootstrapComplete) -> None:
        if self._in_bootstrap and self._full_bootstrap:
            fresh = self._fresh
            for eid in [eid for eid in self._entries if eid not in fresh]:
                del self._entries[eid]
        self._abandon_bootstrap()
        self.bootstraps += 1
        self._synced.set()

    def _abandon_bootstrap(self) -> None:
        self._in_bootstrap = False
        self._full_bootstrap = False
        self._fresh = set()
        self._tombstones = {}
