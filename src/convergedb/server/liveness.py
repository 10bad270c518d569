"""Liveness (SPEC §3): countdowns for lost sources, closing silent connections, retracting
what a dead source held, and the countdowns every source starts after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Final

from ..limits import DEFAULT_LIVENESS_DEADLINE_MS, MAX_SOURCES
from ..protocol.codes import DeleteCause

if TYPE_CHECKING:
    from .app import Server
    from .connection import ServerConnection

log = logging.getLogger("convergedb.liveness")

_MIN_SWEEP_S: Final = 0.02
_MAX_SWEEP_S: Final = 1.0


class Liveness:
    """Decides when a source is dead, and retracts its bit from everything it held."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.expired_sources = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the countdown of every source that holds entities (after a restart their
        writers have one deadline to come back), and the watch over silent connections."""
        engine = self.server.engine
        used = engine.sources_in_use()
        for source_id in range(MAX_SOURCES):
            if used >> source_id & 1:
                deadline = engine.deadline_of(source_id, DEFAULT_LIVENESS_DEADLINE_MS)
                self.server.sources.begin_grace(source_id, deadline)
        if used:
            log.info("%d sources hold entities: their countdowns started", bin(used).count("1"))
        self._task = asyncio.get_running_loop().create_task(self._watch_silence())

    def lost(self, connection: ServerConnection, source_id: int) -> None:
        """A connection that held `source_id` is gone: a countdown of one deadline, or death at
        once when it was closed for silence (it already waited a deadline)."""
        if connection.silent:
            self.expire(source_id)
        else:
            self.server.sources.begin_grace(source_id, connection.liveness_deadline_ms)

    def expire(self, source_id: int) -> None:
        """The source is dead: retract its bit from every entity it holds, in one flush (the
        engine logs how many when it commits)."""
        self.server.engine.expire(1 << source_id, DeleteCause.LIVENESS)
        self.expired_sources += 1
        log.info("source %d expired: retracting it from everything it holds", source_id)

    async def _watch_silence(self) -> None:
        """Close connections that sent nothing for a whole deadline."""
        while True:
            connections = [c for c in self.server.connections if c.connected]
            deadlines = [c.liveness_deadline_ms for c in connections]
            interval = min(deadlines, default=1000) / 4000
            await asyncio.sleep(min(max(interval, _MIN_SWEEP_S), _MAX_SWEEP_S))
            now = time.monotonic()
            for connection in connections:
                if now - connection.last_seen > connection.liveness_deadline_ms / 1000:
                    self._close_silent(connection)

    @staticmethod
    def _close_silent(connection: ServerConnection) -> None:
        if connection.closing:
            return
        log.info("%s was silent for its whole deadline: closing it", connection.peer)
        connection.silent = True
        connection.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.server.sources.close()
