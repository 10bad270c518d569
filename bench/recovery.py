"""Start-up recovery time and memory per entity after a restart.

Method: a server (--no-fsync and a 1 s window, for a fast load) gets N entities of the 10-field
kind in BATCH frames, a SYNC, then SIGTERM (a clean stop, which must exit 0). The server is then
started again on that data directory, with default settings, --runs times: (a) start-up = from
spawning the process to reading its `convergedb listening on` line (interpreter start and
imports included; the server's own "loaded ... in X s" log figure is shown beside it); (b) after
the restarted server has sat idle for --settle seconds, its VmRSS (/proc/PID/status) minus the
median VmRSS of servers started on an EMPTY data directory (measured --runs times the same way),
divided by N, minus the average row bytes = "bytes per entity beyond its row bytes". VmRSS
counts the LMDB pages the load read through its memory map (RssFile) as well as the heap
(RssAnon); both parts are shown. A couple of ids are queried after each restart to check that
the data came back.

    python bench/recovery.py [--quick] [--runs N] [--entities N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import convergedb as cdb
from _common import (
    PLAYER,
    ServerHandle,
    WireConnection,
    load_entities,
    player_row,
    source_state,
    spread,
    start_server,
    verdict,
)
from convergedb.protocol import ConnectMode, GetKind, KindInfo, Query, QueryResult, QueryStatus

TARGET_STARTUP_S = 10.0
TARGET_BYTES_PER_ENTITY = 400.0


@dataclass
class Sample:
    """One server start: how long it took, its log's load time, and its memory (bytes)."""

    startup_s: float
    logged_load_s: float | None
    rss: int
    anon: int
    file: int


def idle_sample(server: ServerHandle, settle_s: float) -> Sample:
    """Let a started server sit idle, then read its memory."""
    time.sleep(settle_s)
    status = server.status()
    return Sample(
        server.startup_seconds,
        server.load_log_seconds(),
        status["VmRSS"],
        status.get("RssAnon", 0),
        status.get("RssFile", 0),
    )


def check_data(server: ServerHandle, entities: int) -> None:
    """The first and last entity are back, with their rows."""
    conn = WireConnection(server.host, server.port)
    try:
        conn.connect(ConnectMode.READ_ONLY, name="bench-recovery")
        kind_id = conn.request(GetKind(PLAYER.name), KindInfo).kind_id
        for i in (0, entities - 1):
            result = conn.request(Query(kind_id, cdb.id_from_int(i)), QueryResult)
            if result.status != QueryStatus.ALIVE or result.data != player_row(i):
                raise RuntimeError(f"entity {i} did not come back: {result}")
    finally:
        conn.close()


def populate(data_dir: Path, entities: int) -> None:
    """Load `entities` into a new data directory and stop the server cleanly."""
    server = start_server(data_dir, "--no-fsync", "--window-ms", "1000")
    try:
        seconds = load_entities(server.host, server.port, entities)
    finally:
        status = server.stop()
    if status != 0:
        raise RuntimeError(f"the loaded server exited with status {status} on SIGTERM")
    print(f"loaded {entities:,} entities in {seconds:.1f} s; stopped cleanly")


def empty_samples(workdir: Path, runs: int, settle_s: float) -> list[Sample]:
    """Servers started on empty data directories, one each."""
    samples = []
    for n in range(runs):
        server = start_server(workdir / f"empty-{n}")
        try:
            samples.append(idle_sample(server, settle_s))
        finally:
            server.stop()
    return samples


def restart_samples(data_dir: Path, entities: int, runs: int, settle_s: float) -> list[Sample]:
    """Restarts on the loaded data directory."""
    samples = []
    for _ in range(runs):
        server = start_server(data_dir)
        try:
            sample = idle_sample(server, settle_s)
            check_data(server, entities)
            samples.append(sample)
        finally:
            server.stop()
    return samples


def average_row_bytes(entities: int) -> float:
    """The mean row length of the loaded entities (every 100th row)."""
    return statistics.mean(len(player_row(i)) for i in range(0, entities, 100))


def report(empty: list[Sample], loaded: list[Sample], entities: int) -> None:
    mib = 1 << 20
    base = {
        "rss": statistics.median(s.rss for s in empty),
        "anon": statistics.median(s.anon for s in empty),
        "file": statistics.median(s.file for s in empty),
    }
    row_bytes = average_row_bytes(entities)
    print(f"\n{'start':>5} {'startup':>8} {'logged load':>11} {'VmRSS':>9} {'RssAnon':>9}"
          f" {'RssFile':>9}")  # fmt: skip
    for label, samples in (("empty", empty), ("full", loaded)):
        for s in samples:
            logged = "-" if s.logged_load_s is None else f"{s.logged_load_s:.2f} s"
            print(
                f"{label:>5} {s.startup_s:>6.2f} s {logged:>11} {s.rss / mib:>5.0f} MiB"
                f" {s.anon / mib:>5.0f} MiB {s.file / mib:>5.0f} MiB"
            )
    median, low, high = spread([s.startup_s for s in loaded])
    print(
        f"\nstart-up recovery, {entities:,} entities: {median:.2f} s  (min {low:.2f}, max"
        f" {high:.2f}, {len(loaded)} restarts)   target <= {TARGET_STARTUP_S:.0f} s:"
        f" {verdict(median <= TARGET_STARTUP_S)}"
    )
    per_entity = [(s.rss - base["rss"]) / entities - row_bytes for s in loaded]
    median, low, high = spread(per_entity)
    print(
        f"bytes per entity beyond its row bytes ({row_bytes:.1f} B avg row), VmRSS:"
        f" {median:.0f}  (min {low:.0f}, max {high:.0f})   target <= {TARGET_BYTES_PER_ENTITY:.0f}:"
        f" {verdict(median <= TARGET_BYTES_PER_ENTITY)}"
    )
    anon = statistics.median((s.anon - base["anon"]) / entities - row_bytes for s in loaded)
    mapped = statistics.median((s.file - base["file"]) / entities for s in loaded)
    print(f"  of which heap (RssAnon) beyond row bytes: {anon:.0f}; LMDB map pages (RssFile):"
          f" {mapped:.0f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 entities")
    parser.add_argument("--entities", type=int, default=None, help="default 1M; quick 100k")
    parser.add_argument("--runs", type=int, default=3, help="restarts (and empty starts)")
    parser.add_argument("--settle", type=float, default=2.0, help="idle seconds before RSS")
    args = parser.parse_args()
    args.entities = args.entities or (100_000 if args.quick else 1_000_000)
    print(__doc__.split("\n\n    python")[0])
    print(f"\nserver code: {source_state()}")
    print(f"\n{args.entities:,} entities, {args.runs} restarts, {args.settle:g} s settle")
    with tempfile.TemporaryDirectory(prefix="cdb-recovery-") as tmp:
        workdir = Path(tmp)
        populate(workdir / "data", args.entities)
        empty = empty_samples(workdir, args.runs, args.settle)
        loaded = restart_samples(workdir / "data", args.entities, args.runs, args.settle)
    report(empty, loaded, args.entities)


if __name__ == "__main__":
    main()
