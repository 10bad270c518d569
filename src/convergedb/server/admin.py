"""The admin HTTP endpoint (`--admin-port`): /metrics, /health and /v1/status."""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from . import native
from .metrics import Metrics

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("convergedb.admin")


def status(server: Server) -> dict[str, Any]:
    """What `convergedb status` shows: sources, kinds, connections, subscribers."""
    now_ms = int(time.time() * 1000)
    connections = [c for c in server.connections if c.connected]
    held = {c.source_id: c for c in connections if c.source_id is not None}
    sources = [
        {
            "source_id": source_id,
            "state": "connected",
            "name": connection.name,
            "peer": connection.peer,
            "connected_at_ms": connection.connected_at_ms,
            "liveness_deadline_ms": connection.liveness_deadline_ms,
            "idle_ms": int((time.monotonic() - connection.last_seen) * 1000),
        }
        for source_id, connection in sorted(held.items())
    ]
    sources += [
        {
            "source_id": source_id,
            "state": "grace",
            "expires_in_ms": max(0, int((handle.when() - server.loop_time()) * 1000)),
        }
        for source_id, handle in sorted(server.sources.grace.items())
    ]
    kinds = [
        {
            "kind_id": kind.kind_id,
            "name": kind.name,
            "schema_version": kind.schema_version,
            "entities": kind.alive,
            "tombstones": kind.tombstones,
            "event_stream": kind.event_stream,
            "disk_backed": kind.disk_backed,
            "system": kind.system,
            "subscribers": kind.watchers,
        }
        for kind in server.catalog.by_id.values()
    ]
    return {
        "version": server.version,
        "write_path": native.state,
        "seq": server.engine.seq,
        "log_backlog": server.store.log_backlog(),
        "checkpointer": {
            "state": "running" if server.checkpointer.alive else "stopped",
            "pid": server.checkpointer.pid,
            "restarts": server.checkpointer.restarts,
        },
        "time_ms": now_ms,
        "connections": {
            "writers": sum(1 for c in connections if not c.read_only),
            "readers": sum(1 for c in connections if c.read_only),
        },
        "sources": sources,
        "kinds": kinds,
    }


class AdminServer:
    """Serves the admin endpoints on the server's host and `--admin-port`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.metrics = Metrics(server)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        host = self.server.config.host
        sock = socket.create_server((host, self.server.config.admin_port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        log.info("admin endpoint on http://%s:%d", host, self.port)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, _request: web.Request) -> web.Response:
        failure = self.server.engine.failure
        if failure is not None:
            return web.json_response({"status": "failing", "error": str(failure)}, status=503)
        return web.json_response({"status": "ok", "seq": self.server.engine.seq})

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(status(self.server))

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
