"""Point-query latency over loopback, and the in-process table lookup alone.

Method: a server (--no-fsync and a 1 s window, so the load is fast; neither matters to reads)
is loaded with N entities of the 10-field kind in BATCH frames, then SYNCed, and the bench waits
until the checkpointer process has moved the log into the entity table (steady state). One read-only
client on a blocking socket (TCP_NODELAY) sends pre-encoded QUERY frames over random ids one at
a time: send, read the whole QUERY_RESULT frame, next. Each run times --queries queries after a
warm-up; every reply is checked (ALIVE, right stream) after the clock stops. Percentiles are per
run; the table shows their median over the runs and the spread. A HEARTBEAT->PONG round trip on
the same connection is measured the same way, as the floor (loopback + frame handling, no table
work), and so is a trivial echo server (uvloop, one `transport.write(data)` per read, its own
process: what any Python server gets on this machine). Then all three again with a client that
polls its non-blocking socket in a busy loop instead of sleeping in the kernel: on a VM the
wake-up of a sleeping process costs tens of µs, and the blocking figures pay it twice per round
trip (server and client); the polling figures keep only the server's. The in-process figure
builds a dict[bytes, Entity] of N entries the way KindState.entities
holds them and times `entities.get(eid)` + `kind.current_row(entity)` in batches of 1,000 random
ids (fresh key objects, so each lookup hashes its id as the server's freshly decoded ids do);
per lookup = batch time / 1,000, loop overhead included.

    python bench/query.py [--quick] [--runs N] [--queries N] [--entities N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import convergedb as cdb
from _common import (
    PLAYER,
    WireConnection,
    free_port,
    load_entities,
    percentile,
    player_row,
    source_state,
    spread,
    start_server,
    verdict,
    wait_checkpointed,
)
from convergedb.protocol import (
    ConnectMode,
    GetKind,
    Heartbeat,
    KindInfo,
    Opcode,
    Query,
    QueryResult,
    QueryStatus,
    encode_message,
)
from convergedb.server.catalog import KindState
from convergedb.server.table import Entity

LOADER_DEADLINE_MS = 3_600_000
TARGET_P50_US = 100.0
TARGET_LOOKUP_US = 5.0
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
LOOKUP_BATCH = 1000


# --- over the wire ----------------------------------------------------------------------------


def query_frames(kind_id: int, entities: int, count: int, rng: random.Random) -> list[bytes]:
    """`count` QUERY frames for random ids, on streams 1, 2, ... (wrapping below 65536)."""
    return [
        encode_message(Query(kind_id, cdb.id_from_int(rng.randrange(entities))), n % 65535 + 1)
        for n in range(count)
    ]


def heartbeat_frames(count: int) -> list[bytes]:
    """`count` HEARTBEAT frames on streams 1, 2, ... (each gets a PONG)."""
    return [encode_message(Heartbeat(), n % 65535 + 1) for n in range(count)]


def round_trips(conn: WireConnection, frames: list[bytes], expect_opcode: int) -> list[int]:
    """Send each frame and read its reply before the next; the round trips in ns. Replies are
    checked after the clock stops. A non-blocking socket is polled (`read_frame_polling`)."""
    read = conn.read_frame if conn.sock.getblocking() else conn.read_frame_polling
    send, clock = conn.send, time.perf_counter_ns
    samples: list[int] = []
    replies = []
    for frame in frames:
        started = clock()
        send(frame)
        reply = read()
        samples.append(clock() - started)
        replies.append(reply)
    for n, reply in enumerate(replies):
        if reply.opcode != expect_opcode or reply.stream_id != n % 65535 + 1:
            raise RuntimeError(f"unexpected reply {reply.opcode:#x} on stream {reply.stream_id}")
        if expect_opcode == Opcode.QUERY_RESULT:
            result = QueryResult.decode(reply.payload)
            if result.status != QueryStatus.ALIVE:
                raise RuntimeError(f"query {n} found no alive entity: {result}")
    return samples


def wire_runs(
    conn: WireConnection, make_frames: Callable[[], list[bytes]], opcode: int, runs: int
) -> list[dict[float, float]]:
    """Per run: {percentile: µs}. A short warm-up precedes the runs."""
    round_trips(conn, make_frames()[:2000], opcode)
    results = []
    for _ in range(runs):
        ordered = sorted(round_trips(conn, make_frames(), opcode))
        results.append({p: percentile(ordered, p) / 1000 for p in PERCENTILES})
    return results


Runs = list[dict[float, float]]


def measure_wire(args: argparse.Namespace, workdir: Path) -> dict[str, Runs]:
    """Load a server, then time QUERY and HEARTBEAT round trips, with a blocking then a polling
    client."""
    admin_port = free_port()
    server = start_server(
        workdir / "data",
        *("--no-fsync", "--window-ms", "1000", "--admin-port", str(admin_port)),
        *("--max-liveness-ms", str(LOADER_DEADLINE_MS)),
    )
    try:
        # the loader disconnects: its entities must outlive the runs
        seconds = load_entities(
            server.host, server.port, args.entities, deadline_ms=LOADER_DEADLINE_MS
        )
        print(f"loaded {args.entities:,} entities in {seconds:.1f} s")
        waited = wait_checkpointed(server.host, admin_port)
        print(f"the checkpointer moved the log into the entity table {waited:.1f} s later")
        conn = WireConnection(server.host, server.port)
        conn.connect(ConnectMode.READ_ONLY, name="bench-query")
        kind_id = conn.request(GetKind(PLAYER.name), KindInfo).kind_id
        rng = random.Random(1)
        results: dict[str, Runs] = {}
        for client in ("blocking", "polling"):
            conn.sock.setblocking(client == "blocking")
            results[f"query {client}"] = wire_runs(
                conn,
                lambda: query_frames(kind_id, args.entities, args.queries, rng),
                Opcode.QUERY_RESULT,
                args.runs,
            )
            results[f"pong {client}"] = wire_runs(
                conn, lambda: heartbeat_frames(args.queries), Opcode.PONG, args.runs
            )
        conn.close()
    finally:
        server.stop()
    results.update(measure_echo(args))
    return results


def serve_echo(ports: mp.Queue[int]) -> None:
    """A trivial echo server on a loopback port (uvloop when installed), forever."""

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
        ports.put(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def measure_echo(args: argparse.Namespace) -> dict[str, Runs]:
    """HEARTBEAT frames echoed by `serve_echo`, blocking then polling."""
    context = mp.get_context("spawn")
    ports: mp.Queue[int] = context.Queue()
    echo = context.Process(target=serve_echo, args=(ports,), daemon=True)
    echo.start()
    try:
        conn = WireConnection("127.0.0.1", ports.get(timeout=30))
        results = {}
        for client in ("blocking", "polling"):
            conn.sock.setblocking(client == "blocking")
            results[f"echo {client}"] = wire_runs(
                conn, lambda: heartbeat_frames(args.queries), Opcode.HEARTBEAT, args.runs
            )
        conn.close()
    finally:
        echo.kill()
    return results


# --- in process -------------------------------------------------------------------------------


def build_table(entities: int) -> KindState:
    """A KindState whose entity table holds `entities` alive entities, as the server keeps
    them after a flush (Entity tuples keyed by 32-byte ids)."""
    kind = KindState(1, PLAYER.definition, (len(PLAYER.definition.fields),))
    table = kind.entities
    assert table is not None
    bit = 1 << 1
    for i in range(entities):
        table[cdb.id_from_int(i)] = Entity(player_row(i), 1, bit, 1, 1, 0, 0)
    return kind


def fresh_keys(rng: random.Random, entities: int, count: int) -> list[bytes]:
    """`count` random ids as new bytes objects (their hash not computed yet)."""
    return [bytes(bytearray(cdb.id_from_int(rng.randrange(entities)))) for _ in range(count)]


def lookup_runs(kind: KindState, entities: int, args: argparse.Namespace) -> list[float]:
    """Per run: the median per-lookup time in µs over batches of LOOKUP_BATCH lookups."""
    table = kind.entities
    assert table is not None
    get, current_row, clock = table.get, kind.current_row, time.perf_counter_ns
    rng = random.Random(2)
    batches = max(1, args.queries // LOOKUP_BATCH)
    results = []
    for _ in range(args.runs):
        per_lookup = []
        for _ in range(batches):
            keys = fresh_keys(rng, entities, LOOKUP_BATCH)
            started = clock()
            for eid in keys:
                current_row(get(eid))  # type: ignore[arg-type]
            per_lookup.append((clock() - started) / LOOKUP_BATCH / 1000)
        results.append(statistics.median(per_lookup))
    return results


# --- report -----------------------------------------------------------------------------------


def print_wire(label: str, runs: list[dict[float, float]], target: float | None) -> None:
    print(f"\n{label} (µs; median of {len(runs)} runs, min..max)")
    for p in PERCENTILES:
        median, low, high = spread([run[p] for run in runs])
        note = ""
        if target is not None and p == 50.0:
            note = f"   target <= {target:.0f} µs: {verdict(median <= target)}"
        print(f"  p{p:<5g} {median:>9.1f}   ({low:.1f} .. {high:.1f}){note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100,000 entities, 3 runs")
    parser.add_argument("--entities", type=int, default=None, help="default 1M; quick 100k")
    parser.add_argument("--queries", type=int, default=20_000, help="queries per run")
    parser.add_argument("--runs", type=int, default=None, help="default 5; quick 3")
    args = parser.parse_args()
    args.entities = args.entities or (100_000 if args.quick else 1_000_000)
    args.runs = args.runs or (3 if args.quick else 5)
    print(__doc__.split("\n\n    python")[0])
    print(f"\nserver code: {source_state()}")
    print(f"\n{args.entities:,} entities, {args.queries:,} queries per run, {args.runs} runs")
    with tempfile.TemporaryDirectory(prefix="cdb-query-") as tmp:
        wire = measure_wire(args, Path(tmp))
    for client, how in (("blocking", "blocking socket"), ("polling", "polling client")):
        print(f"\n--- {how} ---")
        queries, pongs, echoes = (wire[f"{what} {client}"] for what in ("query", "pong", "echo"))
        print_wire(f"QUERY -> QUERY_RESULT round trip, {how}", queries, TARGET_P50_US)
        print_wire(f"HEARTBEAT -> PONG round trip (floor), {how}", pongs, None)
        print_wire(f"trivial echo server, {how} (the machine's floor)", echoes, None)
    kind = build_table(args.entities)
    median, low, high = spread(lookup_runs(kind, args.entities, args))
    print(
        f"\nin-process lookup (entities.get + current_row), per lookup: p50 {median:.2f} µs"
        f"  ({low:.2f} .. {high:.2f}, {args.runs} runs)   target <= {TARGET_LOOKUP_US:.0f} µs:"
        f" {verdict(median <= TARGET_LOOKUP_US)}"
    )


if __name__ == "__main__":
    main()
