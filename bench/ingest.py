"""Ingest throughput: pipelined BATCH writes from several writer processes, fsync on.

Method: a fresh server per run (fsync on, the default; window 20 ms unless --window-ms). Each
writer is its own OS process (so clients never share the server's GIL or each other's) with its
own connection and CLAIMed source id 1..W. The writers SPLIT the entity id space: writer w owns
the ids w, w+W, w+2W, ... of 0..entities-1 and asserts them round after round (round 0 creates
them, later rounds update them: `hp` and `score` change every round, so every assert changes its
entity). Every frame is a BATCH of 100 ASSERTs, all encoded before the clock starts. A writer
sends a SYNC every --sync-every batches and never has more than --max-inflight asserts beyond
its last answered SYNC. Throughput = total asserts / (first send of any writer -> final SYNC
reply of the last writer), so every counted assert is flushed and fsync'd. The SYNC round trip
(SYNC sent -> its OK read) is the writers' view; the flush duration p50/p99 come from the
server's flush-duration histogram (admin /metrics; bucket bounds, so "<= X ms").

    python bench/ingest.py [--quick] [--runs N] [--asserts N]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import multiprocessing.synchronize as mps
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import convergedb as cdb
from _common import (
    PLAYER,
    ServerHandle,
    WireConnection,
    batch_frame,
    free_port,
    percentile,
    player_row,
    source_state,
    spread,
    start_server,
    verdict,
    writer_connection,
)
from convergedb.protocol import (
    ConnectMode,
    Error,
    GetKind,
    KindInfo,
    Ok,
    Query,
    QueryResult,
    QueryStatus,
    Sync,
    decode_message,
    encode_message,
)

TARGET_ASSERTS_PER_S = 200_000
BATCH_SIZE = 100


@dataclass(frozen=True)
class WriterSpec:
    """What one writer process does."""

    host: str
    port: int
    index: int
    writers: int
    entities: int
    asserts: int
    sync_every: int
    max_inflight: int

    @property
    def source_id(self) -> int:
        return self.index + 1

    def ids(self) -> range:
        """The entity ids this writer owns."""
        return range(self.index, self.entities, self.writers)


@dataclass
class WriterResult:
    """What one writer measured (monotonic ns, comparable across processes on Linux)."""

    index: int
    asserts: int
    first_send_ns: int
    last_reply_ns: int
    sync_rtts_ns: list[int] = field(default_factory=list)
    error: str = ""


# --- the writer process -----------------------------------------------------------------------


def encode_frames(spec: WriterSpec, kind_id: int) -> tuple[list[bytes], list[int]]:
    """Every BATCH frame of the writer, in sending order, and the assert count of each."""
    ids = spec.ids()
    frames: list[bytes] = []
    counts: list[int] = []
    left = spec.asserts
    round_ = 0
    while left > 0:
        for start in range(0, len(ids), BATCH_SIZE):
            chunk = ids[start : start + min(BATCH_SIZE, left)]
            frames.append(batch_frame(kind_id, chunk, round_))
            counts.append(len(chunk))
            left -= len(chunk)
            if left == 0:
                break
        round_ += 1
    return frames, counts


def read_replies(conn: WireConnection, replies: queue.Queue[tuple[int, int] | str]) -> None:
    """Reader thread: put (stream id, arrival ns) for each OK, or an error text, and stop at
    the first error or when the connection closes."""
    try:
        while True:
            frame = conn.read_frame()
            arrived = time.monotonic_ns()
            message = decode_message(frame.opcode, frame.payload)
            if isinstance(message, Ok):
                replies.put((frame.stream_id, arrived))
            elif isinstance(message, Error):
                replies.put(f"server ERROR {message.code!r}: {message.message}")
                return
    except OSError as exc:
        replies.put(f"connection: {exc}")


def pipeline(
    conn: WireConnection,
    frames: list[bytes],
    counts: list[int],
    spec: WriterSpec,
    replies: queue.Queue[tuple[int, int] | str],
) -> tuple[int, int, list[int]]:
    """Send every frame with periodic SYNCs; (first send ns, last reply ns, SYNC RTTs ns)."""
    pending: list[tuple[int, int, int]] = []  # (stream, asserts covered, sent ns), oldest first
    rtts: list[int] = []
    sent = acked = last_reply = 0

    def wait_oldest() -> None:
        nonlocal acked, last_reply
        stream, covered, sent_ns = pending.pop(0)
        reply = replies.get(timeout=120)
        if isinstance(reply, str):
            raise RuntimeError(reply)
        if reply[0] != stream:
            raise RuntimeError(f"SYNC replies out of order: {reply[0]} for {stream}")
        rtts.append(reply[1] - sent_ns)
        acked, last_reply = covered, reply[1]

    first = time.monotonic_ns()
    for index, frame in enumerate(frames):
        while pending and sent - acked >= spec.max_inflight:
            wait_oldest()
        conn.send(frame)
        sent += counts[index]
        if (index + 1) % spec.sync_every == 0 or index == len(frames) - 1:
            stream = conn.next_stream()
            sync = encode_message(Sync(), stream)
            pending.append((stream, sent, time.monotonic_ns()))
            conn.send(sync)
    while pending:
        wait_oldest()
    return first, last_reply, rtts


def writer_main(
    spec: WriterSpec, ready: mps.Barrier, results: mp.Queue[WriterResult]
) -> None:  # pragma: no cover - runs in a child process
    """One writer process: connect, encode, wait for the start, pipeline, report."""
    conn, kind_id = writer_connection(spec.host, spec.port, spec.source_id)
    frames, counts = encode_frames(spec, kind_id)
    replies: queue.Queue[tuple[int, int] | str] = queue.Queue()
    threading.Thread(target=read_replies, args=(conn, replies), daemon=True).start()
    ready.wait()
    try:
        first, last, rtts = pipeline(conn, frames, counts, spec, replies)
        results.put(WriterResult(spec.index, sum(counts), first, last, rtts))
    except Exception as exc:
        results.put(WriterResult(spec.index, 0, 0, 0, error=str(exc)))
    finally:
        conn.close()


# --- one run ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    asserts: int
    seconds: float
    sync_rtts_ns: list[int]
    server_cpu_s: float
    flush_buckets: list[tuple[float, float]]
    """The server's flush-duration histogram: (upper bound s, cumulative count)."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check_last_round(server: ServerHandle, args: argparse.Namespace) -> None:
    """Sanity: entity 0 is alive with the row of the last round its writer sent."""
    per_writer = args.asserts // args.writers
    owned = len(range(0, args.entities, args.writers))
    last_round = (per_writer - 1) // owned
    conn = WireConnection(server.host, server.port)
    try:
        conn.connect(ConnectMode.READ_ONLY)
        kind_id = conn.request(GetKind(PLAYER.name), KindInfo).kind_id
        result = conn.request(Query(kind_id, cdb.id_from_int(0)), QueryResult)
    finally:
        conn.close()
    if result.status != QueryStatus.ALIVE or result.data != player_row(0, last_round):
        raise RuntimeError(f"entity 0 does not hold round {last_round}: {result}")


def run_once(args: argparse.Namespace, workdir: Path) -> RunResult:
    """Start a fresh server, run the writers, stop the server."""
    fsync = "--no-fsync" if args.no_fsync else "--fsync"
    admin_port = free_port()
    server = start_server(
        workdir / "data", "--window-ms", str(args.window_ms), fsync, "--admin-port", str(admin_port)
    )
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(args.writers + 1)
    results: mp.Queue[WriterResult] = ctx.Queue()
    specs = [
        WriterSpec(
            server.host,
            server.port,
            index,
            args.writers,
            args.entities,
            args.asserts // args.writers,
            args.sync_every,
            args.max_inflight,
        )
        for index in range(args.writers)
    ]
    processes = [ctx.Process(target=writer_main, args=(s, ready, results)) for s in specs]
    try:
        for process in processes:
            process.start()
        ready.wait(timeout=300)
        cpu_before = cpu_seconds(server.process.pid)
        outcomes = [results.get(timeout=600) for _ in processes]
        cpu_after = cpu_seconds(server.process.pid)
        for process in processes:
            process.join()
        errors = [o.error for o in outcomes if o.error]
        if errors:
            raise RuntimeError("; ".join(errors))
        check_last_round(server, args)
        buckets = flush_histogram(server.host, admin_port)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        server.stop()
    start = min(o.first_send_ns for o in outcomes)
    end = max(o.last_reply_ns for o in outcomes)
    rtts = [rtt for o in outcomes for rtt in o.sync_rtts_ns]
    total = sum(o.asserts for o in outcomes)
    return RunResult(total, (end - start) / 1e9, rtts, cpu_after - cpu_before, buckets)


def flush_histogram(host: str, port: int) -> list[tuple[float, float]]:
    """The cumulative buckets of convergedb_flush_duration_seconds from the admin /metrics."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    return sorted(
        (float(sample.labels["le"]), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "convergedb_flush_duration_seconds_bucket"
    )


# --- report -----------------------------------------------------------------------------------


def bucket_percentile(buckets: list[tuple[float, float]], p: float) -> float:
    """The upper bound (s) of the histogram bucket that holds the p-th percentile."""
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= total * p / 100:
            return bound
    return math.inf


def report(runs: list[RunResult]) -> None:
    rates = [r.asserts / r.seconds for r in runs]
    print()
    print(f"{'run':>4} {'asserts':>10} {'seconds':>8} {'asserts/s':>12} {'srv CPU':>8}"
          f" {'SYNC p50':>9} {'SYNC p99':>9}")  # fmt: skip
    for n, (run, rate) in enumerate(zip(runs, rates, strict=True), 1):
        ordered = sorted(run.sync_rtts_ns)
        print(
            f"{n:>4} {run.asserts:>10,} {run.seconds:>8.2f} {rate:>12,.0f}"
            f" {run.server_cpu_s / run.seconds:>7.0%}"
            f" {percentile(ordered, 50) / 1e6:>7.1f}ms {percentile(ordered, 99) / 1e6:>7.1f}ms"
        )
    median, low, high = spread(rates)
    print()
    print(
        f"asserts/s flushed: {median:,.0f}  (min {low:,.0f}, max {high:,.0f},"
        f" {len(runs)} runs)   target >= {TARGET_ASSERTS_PER_S:,}:"
        f" {verdict(median >= TARGET_ASSERTS_PER_S)}"
    )
    rtt50 = [percentile(sorted(r.sync_rtts_ns), 50) / 1e6 for r in runs]
    rtt99 = [percentile(sorted(r.sync_rtts_ns), 99) / 1e6 for r in runs]
    samples = statistics.mean(len(r.sync_rtts_ns) for r in runs)
    for label, values in (("p50", rtt50), ("p99", rtt99)):
        median, low, high = spread(values)
        print(
            f"SYNC round trip {label} (writers' view): {median:.1f} ms"
            f"  (min {low:.1f}, max {high:.1f}; ~{samples:.0f} SYNCs per run)"
        )
    print(
        "  (while writers keep their pipes full a SYNC waits behind every assert in flight, so"
        " its round trip is about in-flight asserts / throughput; a smaller --max-inflight"
        " brings it closer to the flush itself)"
    )
    for label, p in (("p50", 50), ("p99", 99)):
        bounds = [bucket_percentile(r.flush_buckets, p) * 1000 for r in runs]
        print(
            f"server flush duration {label}: <= {statistics.median(bounds):g} ms"
            f"  (the server's histogram bucket holding it; runs: "
            f"{', '.join(f'{b:g}' for b in bounds)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="200,000 asserts, 2 runs")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3; quick 2)")
    parser.add_argument("--asserts", type=int, default=None, help="total asserts (default 1M)")
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--sync-every", type=int, default=50, help="batches between SYNCs")
    parser.add_argument("--max-inflight", type=int, default=50_000, help="un-synced asserts")
    parser.add_argument("--window-ms", type=int, default=20)
    parser.add_argument("--no-fsync", action="store_true", help="for comparison only")
    args = parser.parse_args()
    args.runs = args.runs or (2 if args.quick else 3)
    args.asserts = args.asserts or (200_000 if args.quick else 1_000_000)
    print(__doc__.split("\n\n    python")[0])
    print(f"\nserver code: {source_state()}")
    print(
        f"\n{args.writers} writer processes, {args.asserts:,} asserts over {args.entities:,}"
        f" entities (split by writer), BATCH of {BATCH_SIZE}, SYNC every {args.sync_every}"
        f" batches, <= {args.max_inflight:,} un-synced asserts per writer,"
        f" window {args.window_ms} ms, fsync {'OFF' if args.no_fsync else 'on'}, {args.runs} runs"
    )
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="cdb-ingest-") as tmp:
            runs.append(run_once(args, Path(tmp)))
        print(".", end="", flush=True, file=sys.stderr)
    report(runs)


if __name__ == "__main__":
    main()
