"""Reconnection: when a client reconnects, how long it waits, and how subscriptions resume.

A client made by `connect(..., reconnect=True)` (the default) that loses its connection:

1. waits with exponential backoff (`ReconnectPolicy`: 100 ms, doubling, capped at 10 s by
   default) between attempts, and keeps trying until it succeeds, the server refuses it for good
   (a bad token, a source the token no longer allows), or `close()` is called;
2. reclaims the same source id with takeover (CONNECT mode 3), so that a server that has not yet
   noticed the old connection died hands the source over with nothing retracted; a read-only
   client reconnects read-only;
3. re-registers the kinds it registered and re-resolves the kinds it resolved (their ids are
   refreshed in the existing handles);
4. re-subscribes each subscription according to its `ReconnectMode`, then calls `on_reconnect`.

A connection closed with TAKEN_OVER is not re-established: another process owns the source now,
and taking it back would make the two fight over it. SHUTTING_DOWN, SLOW_SUBSCRIBER and every
network failure are, a dead link included: a connection from which nothing has been received
for half the liveness deadline, although every heartbeat asks for a PONG
(`Connection.keep_alive`).

Writes are not replayed on the new connection: those sent since the last `Client.sync` on the
lost one may be lost, and the next `sync()` says so with `WritesLost` (once) instead of vouching
for them. Re-asserting the state, best in an epoch, is the writer's move.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass

from ..limits import DEFAULT_RECONNECT_CAP_S, DEFAULT_RECONNECT_INITIAL_S
from .errors import ConnectionLost, InternalError, ShuttingDown, TakenOver


class ReconnectMode(enum.Enum):
    """How a subscription is re-established after its client reconnects.

    Given as `KindHandle.subscribe(mode=...)` or `Mirror(mode=...)`. After reconnecting, the
    subscription first yields a `Resubscribed` item.
    """

    LIVE_ONLY = "live_only"
    """Subscribe again without a bootstrap; changes made during the outage are missed."""
    FULL = "full"
    """Bootstrap the whole kind again. The bootstrap is full: any entity it does not send no
    longer exists (a `Mirror` drops those at the `BootstrapComplete`)."""
    RESUME = "resume"
    """The default: ask for the changes after the last seq the subscription received
    completely. The server answers with a delta bootstrap (only the entities that changed
    since, deleted ones as DELETED changes), or with a full bootstrap when compaction has
    already removed tombstones newer than that point. Either way the consumer ends in exact
    agreement with the server."""


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Whether and how fast a client reconnects (made by `connect` from its arguments).

    The first attempt is made `initial_delay` seconds after the connection is lost; each failed
    attempt doubles the wait, up to `max_delay`. A successful reconnection starts over.

    Raises:
        ValueError: `initial_delay` is not positive, or `max_delay` is below it.
    """

    enabled: bool = True
    """Whether a lost connection is re-established (`connect(reconnect=...)`)."""
    initial_delay: float = DEFAULT_RECONNECT_INITIAL_S
    """Seconds before the first attempt (`connect(reconnect_delay=...)`; 0.1 by default)."""
    max_delay: float = DEFAULT_RECONNECT_CAP_S
    """The longest wait between two attempts (`connect(reconnect_max_delay=...)`; 10 s by
    default)."""

    def __post_init__(self) -> None:
        if not self.initial_delay > 0:
            raise ValueError(f"reconnect_delay must be positive, got {self.initial_delay}")
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"reconnect_max_delay ({self.max_delay}) must be at least reconnect_delay "
                f"({self.initial_delay})"
            )

    def delays(self) -> Iterator[float]:
        """The waits before each attempt: initial, doubled each time, capped.

        Yields:
            Seconds to wait before each attempt, without end.
        """
        delay = self.initial_delay
        while True:
            yield delay
            delay = min(delay * 2, self.max_delay)


def should_reconnect(lost: ConnectionLost) -> bool:
    """Whether a connection lost this way is re-established: not after TAKEN_OVER.

    Args:
        lost: Why the connection was lost.
    """
    return not isinstance(lost.reason, TakenOver)


def is_permanent_refusal(exc: BaseException) -> bool:
    """Whether a failed reconnection attempt means that retrying cannot succeed (from `exc`).

    Network errors, timeouts, a connection lost during the handshake, a server that is shutting
    down or failed internally are retried. Every other error the server answers CONNECT with
    (AUTH_FAILED, FORBIDDEN, ...) is permanent.
    """
    return not isinstance(
        exc, ConnectionLost | OSError | TimeoutError | ShuttingDown | InternalError
    )
