"""A local, always up-to-date copy of a kind, kept from a subscription.

    async with cdb.Mirror(players) as mirror:
        await mirror.wait_synced()          # the first bootstrap is complete
        print(len(mirror), mirror.get("player:ana"))

The rules it applies are described in the docstring of `Mirror`, which is what the API reference
shows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Generic, TypeVar

from .._frozen import frozen_constructor
from ..ids import EntityId
from ..ids import entity_id as make_entity_id
from .handle import EntityKey, KindHandle
from .reconnect import ReconnectMode
from .subscription import (
    DEFAULT_MAX_QUEUE,
    BootstrapComplete,
    BootstrapStarted,
    Change,
    ChangeType,
    Resubscribed,
    Subscription,
    SubscriptionItem,
)

T = TypeVar("T")

ChangeCallback = Callable[[Change[T]], None]
"""Called with each change the mirror applied (not with the ones it ignored as stale)."""


@dataclass(frozen=True, slots=True)
class MirrorEntry(Generic[T]):
    """One entity as a `Mirror` holds it: its version, value, and source set."""

    version: int
    """The entity's version (exact)."""
    value: T
    """The entity's value (exact), an instance of the handle's class."""
    source_set: int
    """Bit N set when source N asserts the entity, as of the entity's last notification (see
    `Mirror`: a change of the source set alone sends no notification)."""


_DELETED: Final = ChangeType.DELETED
"""(A module constant: looking the member up through the enum class costs, once per change.)"""
_new_entry: Final = frozen_constructor(MirrorEntry)
"""`MirrorEntry(version, value, source_set)` without the frozen dataclass's slow `__init__`."""


class Mirror(Generic[T]):
    """A local, always up-to-date copy of one kind, kept from a subscription.

    Use `async with Mirror(handle) as m:` (or `await m.start()` and `await m.close()`) to run
    the subscription in a background task; or make one without starting it and feed it the
    items of your own subscription with `apply`. The mirror is a plain in-memory dict read from
    the event loop's thread: reading it (`get`, `entry`, `items`, `len()`, `in`) never waits.

    It is what most subscribers write by hand, once: a dict of entity id to `MirrorEntry`
    (version, value, source set) fed by `KindHandle.subscribe`, with the rules that make it
    converge to the server's state whatever the interleaving:

    - the highest version wins: a change older than what the mirror holds is ignored (live
      changes and bootstrap frames may interleave, and an entity may arrive twice);
    - DELETED removes the entity;
    - a FULL bootstrap (the first one, a re-bootstrap in `ReconnectMode.FULL`, or a RESUME
      that the server answered with a full bootstrap) is authoritative: it replaces what the
      mirror held from before it, and when it completes, the entities it did not send (and no
      live change mentioned meanwhile) are dropped, because a full bootstrap means "any entity
      not sent does not exist".

    The mirror's versions and values are exact; its source sets are those of each entity's
    last notification: a change of the source set alone (a second source asserting identical
    data, or one of two sources retracting) bumps no version and sends no notification. Query
    the entity when the exact set of sources matters.

    Example:
        ```python
        async with cdb.Mirror(players) as mirror:
            await mirror.wait_synced()  # the first bootstrap is complete
            print(len(mirror), mirror.get("player:ana"))
            seq = await writer.sync()  # after a writer's writes to this kind...
            await mirror.wait_seq(seq)  # ...the mirror shows them
        ```
    """

    def __init__(
        self,
        handle: KindHandle[T],
        *,
        mode: ReconnectMode = ReconnectMode.RESUME,
        on_change: ChangeCallback[T] | None = None,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ) -> None:
        """Make an empty mirror of `handle`'s kind; nothing is sent before `start`.

        Args:
            handle: The kind to mirror (a handle of any client, read-only or not).
            mode: How the subscription is re-established after a reconnection. RESUME (the
                default) keeps the mirror exact at the cost of a delta bootstrap.
            on_change: Called with each change the mirror applies (not with the ones it
                ignores as stale), from the mirror's task: keep it quick.
            max_queue: Items the subscription queues before the client stops reading its
                socket (see `Subscription`).
        """
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
        """Whether an entity is held (`key in mirror`).

        Args:
            key: The entity: an `EntityKey`. A value that names no entity is simply not held.
        """
        try:
            return make_entity_id(key) in self._entries  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[EntityId]:
        """The ids of the entities held."""
        return iter(list(self._entries))

    def get(self, key: EntityKey) -> T | None:
        """The value of an entity, or None if the mirror does not hold it.

        Args:
            key: The entity: an `EntityKey`.

        Raises:
            TypeError: `key` is of a type that names no entity.
            ValueError: `key` is out of range (an int above a u64, bytes over 32).
        """
        entry = self._entries.get(make_entity_id(key))
        return None if entry is None else entry.value

    def entry(self, key: EntityKey) -> MirrorEntry[T] | None:
        """The version, value and source set of an entity, or None if the mirror does not
        hold it.

        Args:
            key: The entity: an `EntityKey`.

        Raises:
            TypeError: `key` is of a type that names no entity.
            ValueError: `key` is out of range.
        """
        return self._entries.get(make_entity_id(key))

    def items(self) -> list[tuple[EntityId, T]]:
        """(entity id, value) of every entity held (a snapshot)."""
        return [(eid, entry.value) for eid, entry in self._entries.items()]

    def entries(self) -> dict[EntityId, MirrorEntry[T]]:
        """A snapshot of the whole mirror: entity id -> `MirrorEntry`."""
        return dict(self._entries)

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the first bootstrap is complete (at once if it is).

        Args:
            timeout: Seconds to wait at most; None waits for ever.

        Raises:
            TimeoutError: `timeout` seconds passed first.
            ConvergeError: The error that ended the mirror's subscription (e.g.
                `ConnectionLost`, `UnknownKind`).
            RuntimeError: The mirror's subscription ended (it was closed) before.
        """
        async with asyncio.timeout(timeout):
            await self._wait_until(self._synced.is_set)

    async def wait_seq(self, seq: int, timeout: float | None = None) -> None:
        """Wait until the mirror reflects every change up to flush `seq`.

        E.g. the seq a writer's `Client.sync` returned after writing to this kind: then the
        mirror equals the server's state as of that flush (or later). The mirror waits until
        it is in sync and has applied a change of `seq` or later, then sends a PING on its
        client's connection and applies everything the server sent before the PONG, so that
        the rest of the flush (its changes share one seq) is applied too. Only changes of this
        kind move the mirror's seq: wait for a seq that a change of this kind carried (or one
        at most the subscription's start), or it waits until such a change comes.

        Args:
            seq: The flush to wait for.
            timeout: Seconds to wait at most; None waits for ever.

        Raises:
            TimeoutError: `timeout` seconds passed first.
            ConvergeError: The error that ended the mirror's subscription.
            RuntimeError: The mirror's subscription ended (it was closed) before.
            WriteRejected: A write sent earlier on the mirror's client was rejected (the PING
                raises it; see `Client`).
            ConnectionLost: The PING could not be sent or answered.
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
        """Subscribe (with a bootstrap) and apply the items in a background task.

        Returns once the server has accepted the subscription; `wait_synced` waits for the
        bootstrap. Entering `async with` calls it; calling it again does nothing.

        Raises:
            ValueError: The mirror's `max_queue` is not a positive int.
            UnknownKind: The kind no longer exists on the server.
            ConnectionLost: The client is not connected.
            WriteRejected: A write sent earlier on the client was rejected (see `Client`).
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
        apply_change = self._apply_change
        progress = self._progress
        own_apply = type(self).apply is Mirror.apply  # else a subclass's `apply` sees every item
        try:
            async for item in subscription:
                if own_apply and item.__class__ is Change:  # `apply` without a call
                    apply_change(item)
                    progress.set()
                else:
                    self.apply(item)
                self._applied += 1
        except Exception as exc:
            self._error = exc
        finally:
            self._progress.set()

    # --- applying -------------------------------------------------------------------------------

    def apply(self, item: SubscriptionItem[T]) -> None:
        """Apply one item of a subscription of the kind (what the mirror's task does).

        Use it to feed a mirror that was not started from a subscription of your own (made
        with `bootstrap=True`).

        Args:
            item: A `Change`, `BootstrapStarted`, `BootstrapComplete` or `Resubscribed`.
        """
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
        # The subscriber's hot path. The highest version wins; during a full bootstrap only
        # what arrived since the bootstrap began counts (the bootstrap's word wins otherwise).
        seq = change.seq
        if seq > self._seq:
            self._seq = seq
        eid = change.entity_id
        version = change.version
        entries = self._entries
        tombstones = self._tombstones
        if not self._full_bootstrap or eid in self._fresh:
            held = entries.get(eid)
            if held is not None and held.version >= version:
                return
            if tombstones:
                dead = tombstones.get(eid)
                if dead is not None and dead >= version:
                    return
        if self._in_bootstrap:
            self._fresh.add(eid)
        value = change.value
        if value is None or change.type is _DELETED:
            entries.pop(eid, None)
            if self._in_bootstrap:
                tombstones[eid] = version
        else:
            entries[eid] = _new_entry(version, value, change.source_set)
            if tombstones:
                tombstones.pop(eid, None)
        if self.on_change is not None:
            self.on_change(change)

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
