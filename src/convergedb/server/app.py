"""The server: wires the store, the engine and the connections together; start-up and shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from collections import Counter

from .. import __version__
from ..protocol.codes import ErrorCode
from ..protocol.errors import ProtocolError
from . import native
from .admin import AdminServer
from .catalog import Catalog
from .checkpoint import Checkpointer
from .config import ServerConfig
from .connection import ServerConnection
from .engine import Engine
from .liveness import Liveness
from .presence import Presence
from .sources import Authenticator, SourceRegistry
from .storage import Store
from .subscriptions import SubscriptionHub

log = logging.getLogger("convergedb.server")

LISTENING_PREFIX = "convergedb listening on"


def tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the entity tables.

    Committed entities are tuples of atomic values (untracked), but the start-up load and
    every flush make many short-lived tracked objects; with the default thresholds the
    collector runs full collections of 50-150 ms during big flushes that free nothing. Moving
    what the load made into the permanent generation and collecting young objects less often
    removes those pauses; reference counting still frees almost everything at once.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class Server:
    """A ConvergeDB server over one data directory."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.version = f"convergedb-python/{__version__}"
        self.catalog = Catalog()
        self.store = Store(config.data_dir, fsync=config.fsync)
        self.engine = Engine(self.catalog, self.store, window_ms=config.window_ms)
        self.checkpointer = Checkpointer(config.data_dir, fsync=config.fsync)
        self.authenticator = Authenticator(config.tokens)
        self.liveness = Liveness(self)
        self.sources = SourceRegistry(self.liveness.expire)
        self.presence: Presence  # made by start(), once the stored kinds are loaded
        self.admin: AdminServer | None = None
        self.connections: set[ServerConnection] = set()
        self.rejected: Counter[int] = Counter()
        """Rejected writes, by error code."""
        self.subscriptions = SubscriptionHub(self)
        self._listener: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        self.host = config.host
        self.port = config.port

    async def start(self) -> None:
        """Load the store, start the flush loop and the countdowns, and listen."""
        started = time.perf_counter()
        entities = self.engine.load()
        self.store.reopen()
        self.checkpointer.start()
        tune_garbage_collector()
        self.presence = Presence(self.catalog, self.engine)
        log.info(
            "loaded %d kinds and %d in-memory entities in %.2fs (seq %d); write path: %s",
            len(self.catalog.by_id),
            entities,
            time.perf_counter() - started,
            self.engine.seq,
            native.state,
        )
        self.engine.on_failure = self._on_engine_failure
        self.engine.start()
        self.liveness.start()
        self._compaction = asyncio.get_running_loop().create_task(self._compact_forever())
        if self.config.admin_port:
            self.admin = AdminServer(self)
            await self.admin.start()
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: ServerConnection(self),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=1024,
        )
        address = self._listener.sockets[0].getsockname()
        self.host, self.port = address[0], address[1]

    def _on_engine_failure(self, exc: BaseException) -> None:
        self._stop_task = asyncio.ensure_future(self.stop())

    # connections ---------------------------------------------------------------------------------

    @staticmethod
    def loop_time() -> float:
        return asyncio.get_running_loop().time()

    def admit(self, connection: ServerConnection) -> bool:
        """Track a new connection; False when the server is at its connection limit."""
        if len(self.connections) >= self.config.max_connections:
            return False
        self.connections.add(connection)
        return True

    def connected(self, connection: ServerConnection) -> None:
        log.info(
            "%s connected: %s%s",
            connection.peer,
            "read-only" if connection.read_only else f"source {connection.source_id}",
            f" ({connection.name})" if connection.name else "",
        )

    def forget(self, connection: ServerConnection) -> None:
        """A connection is gone: its source starts its countdown, its epoch is discarded."""
        self.connections.discard(connection)
        self.subscriptions.drop(connection)
        connection.epoch = None
        source_id = connection.source_id
        released = source_id is not None and self.sources.release(source_id, connection)
        if released and source_id is not None and not self._stopped.is_set():
            self.liveness.lost(connection, source_id)
        if connection.connected:
            log.info("%s disconnected", connection.peer)

    async def _compact_forever(self) -> None:
        """Remove tombstones older than the retention, within a second of their expiry; keep a
        checkpointer running."""
        retention_ms = int(self.config.tombstone_retention_s * 1000)
        interval = min(1.0, max(0.05, self.config.tombstone_retention_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.engine.compact(int(time.time() * 1000) - retention_ms)
            self.checkpointer.ensure_running()

    # shutdown ------------------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop accepting, flush everything received, tell clients, close the store."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        self._compaction.cancel()
        await self.liveness.close()
        if self.admin is not None:
            await self.admin.close()
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.pause_reading()
        await self.engine.close()
        self.subscriptions.close()
        shutting_down = ProtocolError(ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        for connection in list(self.connections):
            connection.send_error(shutting_down, 0)
        if self._listener is not None:
            await self._listener.wait_closed()
        await asyncio.get_running_loop().run_in_executor(None, self.checkpointer.stop)
        self.store.close()
        log.info("stopped")

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT; returns the exit status."""
    server = Server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    print(f"{LISTENING_PREFIX} {server.host}:{server.port}", flush=True)
    waiters = [
        asyncio.ensure_future(stop_requested.wait()),
        asyncio.ensure_future(server.wait_stopped()),
    ]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    await server.stop()
    return 1 if server.engine.failure is not None else 0


def run(config: ServerConfig) -> int:
    """Run a server on a new event loop (uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional on Windows
        return asyncio.run(serve(config))
    if sys.version_info >= (3, 12):  # pragma: no cover
        return uvloop.run(serve(config))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(config))
