"""Who may connect as what: tokens and roles, and which connection holds which source id."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from ..limits import MAX_SOURCE_ID, MAX_SOURCES
from ..protocol.codes import ConnectMode, ErrorCode, Opcode
from ..protocol.errors import ProtocolError
from .config import Role, TokenGrant


class SourceHolder(Protocol):
    """What the registry needs of a connection."""

    def taken_over(self) -> None:
        """Another connection took this one's source over: tell the client and close."""


class Authenticator:
    """Checks a CONNECT's token against the configured grants (anyone, when there are none)."""

    def __init__(self, grants: tuple[TokenGrant, ...]) -> None:
        self._by_token = {grant.token: grant for grant in grants}

    @property
    def open(self) -> bool:
        return not self._by_token

    def authorize(self, token: str, mode: ConnectMode, source_id: int) -> TokenGrant | None:
        """The grant that allows this CONNECT (None on an open server).

        AUTH_FAILED for a missing or unknown token; FORBIDDEN for a mode or source the token
        does not allow.
        """
        if self.open:
            return None
        grant = self._by_token.get(token)
        if grant is None:
            raise ProtocolError(
                ErrorCode.AUTH_FAILED,
                "missing or unknown token: connect with a token the server was configured with",
                Opcode.CONNECT,
            )
        if mode is ConnectMode.READ_ONLY:
            return grant
        if grant.role is Role.READER:
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                "a reader token only opens read-only connections",
                Opcode.CONNECT,
            )
        claims = mode in (ConnectMode.CLAIM, ConnectMode.TAKEOVER)
        if claims and grant.sources is not None and source_id not in grant.sources:
            allowed = ",".join(map(str, sorted(grant.sources)))
            raise ProtocolError(
                ErrorCode.FORBIDDEN,
                f"this token may hold sources {allowed}, not {source_id}",
                Opcode.CONNECT,
            )
        return grant


class SourceRegistry:
    """Which connection holds each source id, and which ids are in a liveness grace period.

    A source whose connection was lost keeps its entities for one deadline (its grace period);
    when the countdown runs out, `on_expire(source_id)` retracts them. Claiming the id in time
    cancels the countdown.
    """

    def __init__(self, on_expire: Callable[[int], None]) -> None:
        self.holders: dict[int, SourceHolder] = {}
        self.grace: dict[int, asyncio.TimerHandle] = {}
        self._on_expire = on_expire

    def is_free(self, source_id: int) -> bool:
        return source_id not in self.holders and source_id not in self.grace

    def begin_grace(self, source_id: int, deadline_ms: int) -> None:
        """Start the countdown of a source nobody holds."""
        self.cancel_grace(source_id)
        loop = asyncio.get_running_loop()
        self.grace[source_id] = loop.call_later(deadline_ms / 1000, self._expire, source_id)

    def cancel_grace(self, source_id: int) -> bool:
        handle = self.grace.pop(source_id, None)
        if handle is None:
            return False
        handle.cancel()
        return True

    def _expire(self, source_id: int) -> None:
        del self.grace[source_id]
        self._on_expire(source_id)

    def close(self) -> None:
        for handle in self.grace.values():
            handle.cancel()
        self.grace.clear()

    def claim(self, source_id: int, holder: SourceHolder, *, takeover: bool) -> SourceHolder | None:
        """Give `source_id` to `holder`; returns the connection it was taken over from, if any.

        A source in its grace period is given back (its countdown is the caller's to cancel).
        """
        if not 0 <= source_id <= MAX_SOURCE_ID:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED,
                f"source ids are 0..{MAX_SOURCE_ID}, not {source_id}",
                Opcode.CONNECT,
            )
        previous = self.holders.get(source_id)
        if previous is not None and not takeover:
            raise ProtocolError(
                ErrorCode.SOURCE_CONFLICT,
                f"source {source_id} is held by a live connection; claim another id, ask for "
                "one to be allocated, or take it over if the old holder is your own dead process",
                Opcode.CONNECT,
            )
        self.cancel_grace(source_id)
        self.holders[source_id] = holder
        return previous

    def allocate(self, holder: SourceHolder, allowed: frozenset[int] | None) -> int:
        """Give `holder` the lowest free source id (among `allowed`, when given)."""
        for source_id in range(MAX_SOURCES):
            if self.is_free(source_id) and (allowed is None or source_id in allowed):
                self.holders[source_id] = holder
                return source_id
        raise ProtocolError(
            ErrorCode.NO_FREE_SOURCE,
            "every source id this connection may use is held or in its liveness grace period",
            Opcode.CONNECT,
        )

    def release(self, source_id: int, holder: SourceHolder) -> bool:
        """`holder` lost its connection; True if it still held the source (not taken over)."""
        if self.holders.get(source_id) is not holder:
            return False
        del self.holders[source_id]
        return True
