"""Liveness expiry: a killed writer's 100,000 entities, and another writer meanwhile.

Method: a fresh server per run (fsync on, the default; window 20 ms unless --window-ms). Up to
four OS processes besides the server:
  - writer A (source 1) CONNECTs with a liveness deadline of --deadline-ms (1,000 ms), asserts
    N entities of the 10-field kind (BATCHes of 1,000, then SYNC), then only sends HEARTBEATs
    (every deadline/4) until it is killed with SIGKILL;
  - writer B (source 2) writes at a constant OFFERED rate: every 1/--rate s (5 ms) a BATCH of
    10 ASSERTs (1,000 entities of its own, rows changing every lap) followed by a SYNC, without
    waiting for earlier SYNCs (open loop). Each SYNC's round trip is measured from the moment
    it was DUE (its slot in the schedule) to its OK, so a stalled server cannot hide its stall
    by slowing B down;
  - a subscriber of the kind (no bootstrap), its own process, when the server supports
    SUBSCRIBE (--subscriber auto): it notes when the DELETED of A's last entity arrives, and
    makes the server do the fan-out a real expiry has to do;
  - this process: it lets B run a warm-up and a quiet period, kills A, and QUERYs a sample of
    A's ids (every N/32nd and the last) every 20 ms: "tombstoned" is the reply showing them
    all gone (one flush retracts them all). A QUERY of all N (after B stops) checks every one
    is a tombstone.
Expiry work time = (kill -> tombstoned) - deadline: what the server spends, beyond the
countdown, noticing the loss, retracting N entities and committing that flush. B's SYNC round
trip p50/p99/max over the SYNCs due from the kill to the end of the expiry (tombstoned, and
the last DELETED received) is printed beside the same figures for the quiet period just
before the kill. Medians over the runs.

    python bench/liveness.py [--quick] [--runs N] [--entities N]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import multiprocessing.synchronize as mps
import os
import queue
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from multiprocessing.context import SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path

from _common import (
    ServerHandle,
    WireConnection,
    assert_entities,
    batch_frame,
    percentile,
    query_statuses,
    source_state,
    spread,
    start_server,
    verdict,
)
from convergedb.protocol import (
    Connect,
    Connected,
    ConnectMode,
    Error,
    GetKind,
    Heartbeat,
    KindInfo,
    Ok,
    Opcode,
    QueryStatus,
    Subscribe,
    SubscribeFlags,
    Sync,
    decode_message,
    encode_message,
)

HOLDER_SOURCE = 1
STEADY_SOURCE = 2
STEADY_IDS = range(1_000_000_000, 1_000_001_000)
"""Writer B's entities (far from A's 0..N-1)."""
STEADY_BATCH = 10
SAMPLE_SIZE = 32
POLL_S = 0.020
WARMUP_S = 0.5
AFTER_S = 1.0
"""How long B goes on after the expiry (its recovery is part of its samples, not the figures)."""
EXPIRED = re.compile(
    r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*source (?P<source>\d+) expired: "
    r"retracted from (?P<count>\d+) entities",
    re.MULTILINE,
)


# --- writer A: holds N entities, then only heartbeats ---------------------------------------------


def holder_main(
    host: str, port: int, entities: int, deadline_ms: int, ready: mps.Event
) -> None:  # pragma: no cover - runs in a child process, killed with SIGKILL
    """Writer A: claim the source with a short deadline, assert every entity, heartbeat."""
    heartbeat_ms = max(1, deadline_ms // 4)
    conn = WireConnection(host, port)
    conn.request(
        Connect(ConnectMode.CLAIM, HOLDER_SOURCE, deadline_ms, heartbeat_ms, "bench-holder"),
        Connected,
    )
    kind_id = conn.create_kind()
    assert_entities(conn, kind_id, range(entities))
    ready.set()
    beat = encode_message(Heartbeat(), 0)
    while True:
        time.sleep(heartbeat_ms / 1000)
        conn.send(beat)


# --- writer B: a constant offered rate ------------------------------------------------------------


@dataclass
class SteadyResult:
    """What writer B measured: per SYNC, when it was due and its round trip (monotonic ns,
    comparable across processes on Linux)."""

    due_ns: list[int] = field(default_factory=list)
    rtt_ns: list[int] = field(default_factory=list)
    late_sends: int = 0
    """SYNCs sent more than one period after they were due (B's own sending fell behind)."""
    error: str = ""


def steady_reader(conn: WireConnection, arrivals: dict[int, int], failed: list[str]) -> None:
    """Reader thread of writer B: record the arrival ns of each OK by stream id."""
    try:
        while True:
            frame = conn.read_frame()
            arrived = time.monotonic_ns()
            reply = decode_message(frame.opcode, frame.payload)
            if isinstance(reply, Ok):
                arrivals[frame.stream_id] = arrived
            elif isinstance(reply, Error):
                failed.append(f"server ERROR {reply.code!r}: {reply.message}")
                return
    except OSError as exc:
        if not failed:
            failed.append(f"connection: {exc}")


def steady_main(
    host: str,
    port: int,
    rate: float,
    started: mps.Event,
    stop: mps.Event,
    results: mp.Queue[SteadyResult],
) -> None:  # pragma: no cover - runs in a child process
    """Writer B: a BATCH of STEADY_BATCH asserts and a SYNC every 1/rate s until told to stop."""
    result = SteadyResult()
    try:
        conn = WireConnection(host, port)
        conn.request(Connect(ConnectMode.CLAIM, STEADY_SOURCE, name="bench-steady"), Connected)
        kind_id = conn.create_kind()
        arrivals: dict[int, int] = {}
        failed: list[str] = []
        threading.Thread(target=steady_reader, args=(conn, arrivals, failed), daemon=True).start()
        period_ns = int(1e9 / rate)
        sent: list[tuple[int, int]] = []  # (stream, due ns)
        ids = list(STEADY_IDS)
        slot = 0
        first_due = time.monotonic_ns() + period_ns
        started.set()
        while not stop.is_set() and not failed:
            due = first_due + slot * period_ns
            now = time.monotonic_ns()
            if now < due:
                time.sleep((due - now) / 1e9)
            elif now - due > period_ns:
                result.late_sends += 1
            start = slot * STEADY_BATCH % len(ids)
            lap = slot * STEADY_BATCH // len(ids) + 1
            stream = conn.next_stream()
            frame = batch_frame(kind_id, ids[start : start + STEADY_BATCH], lap)
            conn.send(frame + encode_message(Sync(), stream))
            sent.append((stream, due))
            slot += 1
        give_up = time.monotonic() + 120
        while len(arrivals) < len(sent) and not failed and time.monotonic() < give_up:
            time.sleep(0.01)
        if failed:
            raise RuntimeError(failed[0])
        if len(arrivals) < len(sent):
            raise RuntimeError(f"{len(sent) - len(arrivals)} SYNCs unanswered after 120 s")
        for stream, due in sent:
            result.due_ns.append(due)
            result.rtt_ns.append(arrivals[stream] - due)
        conn.close()
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    results.put(result)


# --- watching A's entities ------------------------------------------------------------------------


def read_only(host: str, port: int) -> WireConnection:
    """A read-only connection."""
    conn = WireConnection(host, port)
    conn.request(Connect(ConnectMode.READ_ONLY, name="bench-watcher"), Connected)
    return conn


def wait_tombstoned(conn: WireConnection, kind_id: int, sample: list[int], timeout_s: float) -> int:
    """QUERY the sample every POLL_S until all are tombstones; the monotonic ns of the reply
    that showed it."""
    give_up = time.monotonic() + timeout_s
    next_poll = time.monotonic()
    while time.monotonic() < give_up:
        statuses = query_statuses(conn, kind_id, sample)
        seen = time.monotonic_ns()
        if all(s == QueryStatus.TOMBSTONE for s in statuses):
            return seen
        next_poll += POLL_S
        time.sleep(max(0.0, next_poll - time.monotonic()))
    raise RuntimeError(f"A's entities were not all tombstones after {timeout_s:.0f} s")


@dataclass
class SubscriberReport:
    """What the subscriber process tells: first whether SUBSCRIBE was accepted, at the end
    how many of A's entities it got a DELETED for and when the last one arrived."""

    refusal: str = ""
    deleted: int = 0
    last_ns: int = 0
    final: bool = False


def subscriber_main(
    host: str,
    port: int,
    kind_id: int,
    entities: int,
    stop: mps.Event,
    reports: mp.Queue[SubscriberReport],
) -> None:  # pragma: no cover - runs in a child process
    """A subscriber of the kind (no bootstrap): counts DELETED of A's ids (0..entities-1) as
    cheaply as it can (opcode and id bytes, no full decode) until it has them all or is told
    to stop."""
    conn = read_only(host, port)
    stream = conn.next_stream()
    conn.send(encode_message(Subscribe(kind_id, SubscribeFlags.NONE), stream))
    while True:
        frame = conn.read_frame()
        reply = decode_message(frame.opcode, frame.payload)
        if isinstance(reply, Error):
            reports.put(SubscriberReport(refusal=f"{reply.code!r}: {reply.message}"))
            conn.close()
            return
        if frame.stream_id == stream and isinstance(reply, Ok):
            break
    reports.put(SubscriberReport())
    conn.sock.settimeout(0.2)
    deleted_op = int(Opcode.DELETED)
    gone: set[bytes] = set()
    last_ns = 0
    while len(gone) < entities and not stop.is_set():
        try:
            frame = conn.read_frame()
        except TimeoutError:
            continue
        if frame.opcode == deleted_op and frame.stream_id == stream:
            eid = bytes(frame.payload[2:34])  # after kind_id u16
            if int.from_bytes(eid[:8], "little") < entities:
                gone.add(eid)
                last_ns = time.monotonic_ns()
    reports.put(SubscriberReport(deleted=len(gone), last_ns=last_ns, final=True))
    conn.close()


# --- one run --------------------------------------------------------------------------------------


@dataclass
class Window:
    """Writer B's SYNC round trips (ms) in a stretch of time."""

    rtts_ms: list[float]

    @property
    def count(self) -> int:
        return len(self.rtts_ms)

    def p(self, q: float) -> float:
        return percentile(sorted(self.rtts_ms), q)


@dataclass
class RunResult:
    """What one run measured."""

    load_s: float
    tombstoned_s: float
    """Kill -> every sampled entity of A seen as a tombstone by QUERY."""
    delivered_s: float | None
    """Kill -> the subscriber got the last of A's DELETED (None: no subscriber)."""
    deleted: int
    """How many of A's entities the subscriber got a DELETED for."""
    logged_s: float | None
    """Kill -> the server's "source expired" log line (retractions queued), if found."""
    quiet: Window
    expiry: Window
    late_sends: int
    no_subscriber: str
    """Why no subscriber was attached ("" when one was)."""


def expired_log_time(server: ServerHandle) -> float | None:
    """The wall time of the server's "source 1 expired: retracted from N" line, if any."""
    with server.log_path.open("rb") as log:
        log.seek(server.log_offset)
        text = log.read().decode(errors="replace")
    for match in EXPIRED.finditer(text):
        if int(match["source"]) == HOLDER_SOURCE:
            at = datetime.strptime(match["at"], "%Y-%m-%d %H:%M:%S,%f")
            return at.timestamp()
    return None


def window(result: SteadyResult, start_ns: int, end_ns: int) -> Window:
    """B's SYNCs due in [start_ns, end_ns]."""
    rtts = [
        rtt / 1e6
        for due, rtt in zip(result.due_ns, result.rtt_ns, strict=True)
        if start_ns <= due <= end_ns
    ]
    if not rtts:
        raise RuntimeError("writer B sent no SYNC in a measured window")
    return Window(rtts)


def start_subscriber(
    args: argparse.Namespace,
    server: ServerHandle,
    kind_id: int,
    ctx: SpawnContext,
    stop: mps.Event,
    reports: mp.Queue[SubscriberReport],
) -> tuple[BaseProcess | None, str]:
    """(the subscriber process once SUBSCRIBE was accepted, ""), or (None, why not) when
    --subscriber is off or it is auto and the server refused SUBSCRIBE."""
    if args.subscriber == "off":
        return None, "--subscriber off"
    process = ctx.Process(
        target=subscriber_main,
        args=(server.host, server.port, kind_id, args.entities, stop, reports),
    )
    process.start()
    first = reports.get(timeout=60)
    if not first.refusal:
        return process, ""
    process.join(10)
    if args.subscriber == "on":
        raise RuntimeError(f"SUBSCRIBE refused: {first.refusal}")
    return None, f"SUBSCRIBE refused: {first.refusal}"


def wait_for(event: mps.Event, process: BaseProcess, what: str, timeout_s: float) -> None:
    """Wait for a child process to set `event`; fail early if it dies first."""
    give_up = time.monotonic() + timeout_s
    while not event.wait(0.2):
        if not process.is_alive():
            raise RuntimeError(f"{what}: the process exited ({process.exitcode})")
        if time.monotonic() > give_up:
            raise RuntimeError(f"{what}: not done within {timeout_s:.0f} s")


def run_once(args: argparse.Namespace, workdir: Path) -> RunResult:
    """Start a fresh server, load A, start the subscriber and B, kill A, watch the expiry,
    stop everything."""
    server = start_server(workdir / "data", "--window-ms", str(args.window_ms), "--fsync")
    ctx = mp.get_context("spawn")
    ready, started, stop, sub_stop = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Event()
    results: mp.Queue[SteadyResult] = ctx.Queue()
    reports: mp.Queue[SubscriberReport] = ctx.Queue()
    holder = ctx.Process(
        target=holder_main, args=(server.host, server.port, args.entities, args.deadline_ms, ready)
    )
    steady = ctx.Process(
        target=steady_main, args=(server.host, server.port, args.rate, started, stop, results)
    )
    processes: list[BaseProcess] = [holder]
    poller: WireConnection | None = None
    try:
        load_started = time.perf_counter()
        holder.start()
        wait_for(ready, holder, "writer A loading its entities", 300)
        load_s = time.perf_counter() - load_started
        poller = read_only(server.host, server.port)
        kind_id = poller.request(GetKind("bench_player"), KindInfo).kind_id
        subscriber, no_subscriber = start_subscriber(args, server, kind_id, ctx, sub_stop, reports)
        if subscriber is not None:
            processes.append(subscriber)
        processes.append(steady)
        steady.start()
        wait_for(started, steady, "writer B starting", 120)
        time.sleep(WARMUP_S + args.quiet_s)

        step = max(1, args.entities // SAMPLE_SIZE)
        sample = sorted({*range(0, args.entities, step), args.entities - 1})
        kill_ns = time.monotonic_ns()
        kill_wall = time.time()
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)
        done_ns = wait_tombstoned(poller, kind_id, sample, args.deadline_ms / 1000 + 300)
        final = SubscriberReport(final=True)
        if subscriber is not None:
            try:
                final = reports.get(timeout=120)
            except queue.Empty:
                sub_stop.set()
                final = reports.get(timeout=30)
        end_ns = max(done_ns, final.last_ns)
        time.sleep(max(0.0, AFTER_S - (time.monotonic_ns() - end_ns) / 1e9))
        stop.set()
        outcome = results.get(timeout=300)
        steady.join(60)
        if outcome.error:
            raise RuntimeError(f"writer B: {outcome.error}")
        check_all(poller, kind_id, args.entities)
        logged = expired_log_time(server)
    finally:
        stop.set()
        sub_stop.set()
        for process in processes:
            if process.pid is None:
                continue  # never started
            if process.is_alive():
                process.kill()
            process.join(10)
        if poller is not None:
            poller.close()
        server.stop()
    return RunResult(
        load_s,
        (done_ns - kill_ns) / 1e9,
        (final.last_ns - kill_ns) / 1e9 if subscriber is not None else None,
        final.deleted,
        None if logged is None else logged - kill_wall,
        window(outcome, kill_ns - int(args.quiet_s * 1e9), kill_ns - 1),
        window(outcome, kill_ns, end_ns),
        outcome.late_sends,
        no_subscriber,
    )


def check_all(conn: WireConnection, kind_id: int, entities: int) -> None:
    """Every entity of A is a tombstone; writer B's are alive."""
    statuses = query_statuses(conn, kind_id, range(entities))
    alive = [i for i, s in enumerate(statuses) if s != QueryStatus.TOMBSTONE]
    if alive:
        raise RuntimeError(f"{len(alive):,} of A's entities are not tombstones, e.g. {alive[:5]}")
    steady = query_statuses(conn, kind_id, STEADY_IDS)
    if any(s != QueryStatus.ALIVE for s in steady):
        raise RuntimeError("some of writer B's entities are not alive")


# --- report ---------------------------------------------------------------------------------------


def report(runs: list[RunResult], args: argparse.Namespace) -> None:
    """The per-run table, the medians side by side, and what they mean."""
    deadline_s = args.deadline_ms / 1000
    print()
    print(f"{'run':>4} {'load s':>7} {'kill->log':>10} {'kill->gone':>11} {'work':>6}"
          f" {'->DELETED':>10} {'B quiet p50/p99/max':>21} {'B expiry p50/p99/max':>22}"
          "   (ms)")  # fmt: skip
    for n, run in enumerate(runs, 1):
        log_cell = "?" if run.logged_s is None else f"{run.logged_s * 1e3:.0f}"
        sub_cell = "-" if run.delivered_s is None else f"{run.delivered_s * 1e3:.0f}"
        q, e = run.quiet, run.expiry
        print(
            f"{n:>4} {run.load_s:>7.2f} {log_cell:>10} {run.tombstoned_s * 1e3:>11.0f}"
            f" {(run.tombstoned_s - deadline_s) * 1e3:>6.0f} {sub_cell:>10}"
            f" {q.p(50):>6.1f}/{q.p(99):>6.1f}/{q.p(100):>7.1f}"
            f" {e.p(50):>7.1f}/{e.p(99):>6.1f}/{e.p(100):>7.1f}"
        )
    print()
    median, low, high = spread([r.tombstoned_s * 1e3 for r in runs])
    print(
        f"kill -> all {args.entities:,} entities of A tombstones (QUERY): {median:,.0f} ms"
        f"  (min {low:,.0f}, max {high:,.0f}; deadline {args.deadline_ms} ms)"
    )
    works = [(r.tombstoned_s - deadline_s) * 1e3 for r in runs]
    median, low, high = spread(works)
    print(f"expiry work time (that minus the deadline): {median:,.0f} ms"
          f"  (min {low:,.0f}, max {high:,.0f})")  # fmt: skip
    logged = [r.logged_s * 1e3 for r in runs if r.logged_s is not None]
    if logged:
        print(
            "  of which kill -> the server logs 'source 1 expired' (its retractions queued,"
            f" their flush not started): {statistics.median(logged):,.0f} ms"
            " (server log clock, 1 ms resolution)"
        )
    delivered = [r.delivered_s * 1e3 for r in runs if r.delivered_s is not None]
    if delivered:
        median, low, high = spread(delivered)
        deleted = min(r.deleted for r in runs)
        print(
            f"kill -> a subscriber of the kind has the last DELETED: {median:,.0f} ms"
            f"  (min {low:,.0f}, max {high:,.0f}; at least {deleted:,} of {args.entities:,}"
            " DELETED received in every run)"
        )
    else:
        print(f"no subscriber attached ({runs[0].no_subscriber})")
    print()
    print(f"writer B, SYNC round trip from when it was due ({args.rate:.0f} BATCHes of"
          f" {STEADY_BATCH} + SYNC per s), medians over the runs:")  # fmt: skip
    print(f"  {'':>6} {'quiet (before kill)':>20} {'kill -> expiry done':>20}")
    for label, level in (("p50", 50.0), ("p99", 99.0), ("max", 100.0)):
        quiet = statistics.median(r.quiet.p(level) for r in runs)
        expiry = statistics.median(r.expiry.p(level) for r in runs)
        print(f"  {label:>6} {quiet:>17.1f} ms {expiry:>17.1f} ms")
    counts = (
        statistics.median(r.quiet.count for r in runs),
        statistics.median(r.expiry.count for r in runs),
    )
    print(f"  {'SYNCs':>6} {counts[0]:>20.0f} {counts[1]:>20.0f}")
    print(
        "  ('expiry done': all tombstones seen by QUERY and, with a subscriber, the last"
        " DELETED received)"
    )
    late = sum(r.late_sends for r in runs)
    if late:
        print(
            f"  ({late} of B's sends left more than one period late: B's own process fell"
            " behind or its socket was full; their wait still counts from when they were due)"
        )
    stall = statistics.median(r.expiry.p(100) for r in runs)
    work = statistics.median(works)
    print()
    print(
        "What it means: while the server expires a dead source it must keep serving the"
        " others. B's longest SYNC wait from the kill to the end of the expiry is the longest"
        " it was stalled; it must stay well below the expiry work time, or every other writer"
        " (and every reader waiting on a SYNC) freezes for as long as the expiry lasts."
    )
    if work > 0:
        print(
            f"  Here: B stalled {stall:,.0f} ms, the expiry work took {work:,.0f} ms"
            f" ({stall / work:.0%} of it). Not stalled for the whole expiry"
            f" (criterion: longest stall < half the work time): {verdict(stall < 0.5 * work)}"
        )
    else:
        print("  Here: the expiry took no measurable time beyond the deadline.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="20,000 entities, 3 runs")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 5; quick 3)")
    parser.add_argument("--entities", type=int, default=None, help="default 100,000")
    parser.add_argument("--deadline-ms", type=int, default=1000, help="writer A's deadline")
    parser.add_argument("--rate", type=float, default=200.0, help="writer B's BATCH+SYNC per s")
    parser.add_argument("--quiet-s", type=float, default=3.0, help="quiet period before kill")
    parser.add_argument("--window-ms", type=int, default=20)
    parser.add_argument(
        "--subscriber", choices=("auto", "on", "off"), default="auto",
        help="attach a subscriber of the kind (auto: if the server supports SUBSCRIBE)",
    )  # fmt: skip
    args = parser.parse_args()
    args.runs = args.runs or (3 if args.quick else 5)
    args.entities = args.entities or (20_000 if args.quick else 100_000)
    print(__doc__.split("\n\n    python")[0])
    print(f"\nserver code: {source_state()}")
    print(
        f"\nwriter A: {args.entities:,} entities, deadline {args.deadline_ms} ms; writer B:"
        f" {args.rate:.0f} x (BATCH of {STEADY_BATCH} + SYNC) per s; quiet period"
        f" {args.quiet_s:.1f} s; subscriber {args.subscriber}; window {args.window_ms} ms,"
        f" fsync on; {args.runs} runs (a fresh server each)"
    )
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="cdb-liveness-") as tmp:
            runs.append(run_once(args, Path(tmp)))
        print(".", end="", flush=True, file=sys.stderr)
    report(runs, args)


if __name__ == "__main__":
    main()
