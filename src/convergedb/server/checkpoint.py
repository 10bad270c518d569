"""The checkpointer: a child process that moves the store's log into its entities database.

Flushes of in-memory kinds append one log value each (see `storage.py`). Moving those records
into the `entities` B-tree is the expensive part of persistence (a random page update per
entity, the GIL released and retaken around each one), so it runs in a process of its own, on
the other core, where it cannot slow the event loop: it opens the same LMDB environment and
applies the oldest log records in bounded transactions (LMDB serialises them with the server's
flush commits, so a checkpoint holds up a flush commit for at most one such transaction).

The log is the truth until the checkpointer has moved it: the server replays what is left at
start-up, so the checkpointer may die or lag at any moment without losing anything; it only
bounds the replay. It stops when asked, and on its own when the server process is gone.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
from pathlib import Path
from typing import Final

from .storage import Store

log = logging.getLogger("convergedb.checkpoint")

MAX_RECORDS_PER_CHECKPOINT: Final = 2_000
"""Records moved per transaction: bounds how long a flush commit may wait for one, to a few
milliseconds (the records are read and merged before the transaction, which only writes
them, ~2 µs each, then syncs)."""
IDLE_POLL_S: Final = 0.1
"""How often an idle checkpointer looks at the log again."""


def run_checkpointer(
    data_dir: str, fsync: bool, stop: multiprocessing.connection.Connection
) -> None:  # pragma: no cover - runs in the child process (its effects are tested)
    """The child process: checkpoint until the server says stop or is gone (`stop` becomes
    readable either way: a message, or the end of the pipe when the server's end closes)."""
    with contextlib.suppress(OSError):
        os.nice(5)  # the server's own work comes first
    # no meta-page sync: a system crash may undo the last move, which the log still holds
    store = Store(Path(data_dir), fsync=fsync, metasync=False)
    try:
        idle = 0.0
        while not stop.poll(idle):
            moved = store.checkpoint(MAX_RECORDS_PER_CHECKPOINT)
            idle = 0.0 if moved >= MAX_RECORDS_PER_CHECKPOINT else IDLE_POLL_S
    finally:
        store.close()


class Checkpointer:
    """The server's handle on its checkpointer process."""

    def __init__(self, data_dir: Path, *, fsync: bool) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._data_dir = str(data_dir)
        self._fsync = fsync
        self._stopping = False
        self._process, self._stop = self._new_process()
        self.restarts = 0

    def _new_process(
        self,
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]:
        """A checkpointer process (not started) and the pipe end that stops it."""
        receive, send = self._context.Pipe(duplex=False)
        self._child_end = receive  # closed here once the child has its own copy
        process = self._context.Process(
            target=run_checkpointer,
            args=(self._data_dir, self._fsync, receive),
            name="convergedb-checkpoint",
            daemon=True,
        )
        return process, send

    def start(self) -> None:
        self._process.start()
        self._child_end.close()

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def ensure_running(self) -> None:
        """Start a new checkpointer if the last one died (nothing is lost meanwhile: the log
        keeps every record until a checkpointer moves it)."""
        if self._stopping or self._process.is_alive():
            return
        log.warning("the checkpointer exited (code %s); starting a new one", self._process.exitcode)
        self._stop.close()
        self._process, self._stop = self._new_process()
        self.start()
        self.restarts += 1

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the checkpointer to finish its transaction and exit; kill it after `timeout`."""
        self._stopping = True
        if self._process.pid is None:
            return
        self._stop.send(None)
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the checkpointer did not stop in %.0fs; killing it", timeout)
            self._process.kill()
            self._process.join()
