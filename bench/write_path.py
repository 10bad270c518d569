"""The server's write path in-process: CPU per assert, stage by stage, with nothing else running.

Method: a real Server object over a fresh data directory (fsync off: this measures Python, not
the disk), a connection object that claimed a source, fed the bytes of pre-encoded BATCH frames
of 100 ASSERTs through `data_received` exactly as the event loop would hand them over (frame
reader, BATCH parsing, row check, accumulator), then `Engine.flush()` (net change, log value,
commit of that one value, apply). Every round asserts each of --per-flush entities (out of
--entities, all created first) with a changed row, so every assert is a real update. Each figure
is the median over --rounds rounds of (stage CPU time of the process / asserts; CPU time, so
that other programs on the machine do not count); the spread is printed too.

This is where the ingest bench's ceiling comes from: one core runs all of it, so
1 / (receive + flush) is the most asserts/s one server process can absorb.

    python bench/write_path.py [--entities N] [--per-flush N] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import convergedb as cdb
from _common import PLAYER, batch_frame
from convergedb.server.app import Server, tune_garbage_collector
from convergedb.server.config import ServerConfig
from convergedb.server.connection import ServerConnection
from convergedb.server.presence import Presence

BATCH_SIZE = 100
SOURCE_ID = 1


def frames_for(kind_id: int, ids: range | list[int], round_: int) -> bytes:
    """The encoded BATCH frames asserting `ids` with their rows of `round_`, as one stream."""
    return b"".join(
        batch_frame(kind_id, ids[i : i + BATCH_SIZE], round_)
        for i in range(0, len(ids), BATCH_SIZE)
    )


def writer(server: Server) -> ServerConnection:
    """A connection object that has claimed source 1, without a socket."""
    conn = ServerConnection(server)
    conn.connected = True
    conn.read_only = False
    conn.source_id = SOURCE_ID
    conn.bit = 1 << SOURCE_ID
    return conn


async def measure(args: argparse.Namespace, data_dir: Path) -> tuple[list[float], list[float]]:
    server = Server(ServerConfig(data_dir=data_dir, fsync=False, admin_port=0, port=0))
    server.engine.load()
    server.presence = Presence(server.catalog, server.engine)
    kind, _ = server.catalog.register(PLAYER.definition)
    server.engine.kind_changed(kind, None)
    conn = writer(server)
    engine = server.engine
    conn.data_received(frames_for(kind.kind_id, range(args.entities), 0))
    await engine.flush()
    tune_garbage_collector()
    receive: list[float] = []
    flush: list[float] = []
    per_flush = args.per_flush
    rounds = []  # encoded before measuring: in a server, other processes encode
    for round_ in range(1, args.rounds + 1):
        start = (round_ * per_flush) % args.entities
        ids = [(start + i) % args.entities for i in range(per_flush)]
        rounds.append(frames_for(kind.kind_id, ids, round_))
    for stream in rounds:
        began = time.process_time()
        conn.data_received(stream)
        received = time.process_time()
        await engine.flush()
        flushed = time.process_time()
        receive.append((received - began) / per_flush * 1e6)
        flush.append((flushed - received) / per_flush * 1e6)
    check = engine.committed(kind, cdb.id_from_int(ids[-1]))
    assert check is not None and check.version == 2 + (args.rounds * per_flush - 1) // args.entities
    await engine.close()
    server.store.close()
    return receive, flush


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--per-flush", type=int, default=10_000, help="asserts per flush")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convergedb-write-path-") as tmp:
        receive, flush = asyncio.run(measure(args, Path(tmp)))
    total = [r + f for r, f in zip(receive, flush, strict=True)]
    print(
        f"{args.entities:,} entities, {args.per_flush:,} changed asserts per flush "
        f"(BATCH of {BATCH_SIZE}), {args.rounds} rounds, fsync off, in-process"
    )
    for name, values in (("receive", receive), ("flush", flush), ("total", total)):
        print(
            f"  {name:8} {statistics.median(values):6.2f} µs/assert  "
            f"(min {min(values):.2f}, max {max(values):.2f})"
        )
    print(f"  ceiling of one core: {1e6 / statistics.median(total):,.0f} asserts/s")


if __name__ == "__main__":
    main()
