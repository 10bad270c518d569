"""Fan-out: notifications delivered to subscribers, and their end-to-end latency.

Method: a fresh server per run (window 20 ms, fsync on unless --no-fsync). --subscribers
subscriber processes (default 10) each open a read-only connection and SUBSCRIBE (no bootstrap)
to one kind of --entities entities (default 10,000, created before they subscribe). One writer
process CLAIMs a source and ASSERTs entities round-robin, alternating two rows per entity so that
every write really changes it (and, with 10,000 entities, no two writes of one entity share a
window: nothing is coalesced away).

- Constant rate: the writer offers --rate changes/s (default 20,000) on a fixed schedule: write k
  is due at start + k / rate, and each millisecond tick sends, in one BATCH, every write that is
  due by then (a writer that falls behind catches up in bigger batches; nothing is skipped). Each
  write carries its INTENDED send time (monotonic ns, comparable across processes on Linux) as
  its 8-byte metadata, which the notification carries back. Latency = intended send time ->
  notification read by the subscriber, so a stall anywhere (writer, server, subscriber) shows up
  instead of being hidden by a writer that waits. The first second is warm-up and not counted.
  Reported: notifications/s delivered (all subscribers together, over the offered period) and
  the latency p50 / p99 / max of every notification of every subscriber.
- Saturation: the writer sends BATCHes of 1,000 as fast as the server takes them (a SYNC every
  20 batches bounds what is in flight) for --seconds; reported: notifications delivered per second
  in aggregate, from the first write sent to the last notification read.

Subscribers parse frames with struct on a byte buffer (no message objects), so that the Python
clients cost as little as possible; they share the machine with the server all the same. Each
figure is the median of --runs runs (min..max beside it), because this machine stalls now and then.

    python bench/fanout.py [--quick] [--runs N] [--rate N] [--subscribers N] [--seconds S]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import struct
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

import convergedb as cdb
from _common import (
    PLAYER,
    WireConnection,
    percentile,
    source_state,
    spread,
    start_server,
    verdict,
)
from convergedb.protocol import (
    Assert,
    Batch,
    Connect,
    ConnectMode,
    Heartbeat,
    Ok,
    Opcode,
    Subscribe,
    Sync,
    decode_message,
    encode_frame,
    encode_message,
)

TARGET_AGGREGATE = 200_000
"""Notifications/s delivered in aggregate at saturation."""
LATENCY_SLACK_MS = 5.0
"""Target: p50 <= one coalescing window + this."""
WARMUP_S = 1.0
HEARTBEAT_S = 5.0
SUB_STREAM = 1
_HEADER = struct.Struct("<BBHHIH")
_SEQ = struct.Struct("<Q")
_STATE_SEQ_OFFSET = 2 + 32 + 1 + 8 + 8 + 8
STATE_HEAD_SIZE = _STATE_SEQ_OFFSET + 8 + 4
"""A STATE payload before its data: ..., seq u64, data length u32."""
"""Where `seq` sits in a STATE payload (kind_id, eid, type, version, source_set, changed)."""
_META_NS = struct.Struct("<q")
_OP_HEAD = struct.Struct("<BI")
_U16_8 = struct.Struct("<H").pack(8)


@dataclass(frozen=True)
class Plan:
    """What one run does."""

    host: str
    port: int
    kind_id: int
    entities: int
    rate: int
    """Offered changes/s; 0 = as fast as the server takes them (saturation)."""
    seconds: float


@dataclass
class SubscriberResult:
    notifications: int
    last_read_ns: int
    intended_ns: bytes
    """array('q'): each notification's intended send time (its write's metadata)."""
    latencies_ns: bytes
    """array('q'): each notification's latency (read time - intended send time)."""


@dataclass
class WriterResult:
    writes: int
    first_send_ns: int
    measured_from_ns: int
    """Intended send time from which notifications count (after the warm-up)."""
    last_seq: int


# --- the subscriber process ------------------------------------------------------------------


class Reader:
    """A subscriber's reading loop state: frames of one fixed size are parsed at C speed."""

    def __init__(self, frame_size: int) -> None:
        self.frame_size = frame_size
        self.buffer = bytearray()
        self.count = 0
        self.last_seq = 0
        self.last_read_ns = 0
        self.chunks: list[tuple[int, bytes]] = []
        """(read time ns, array('q') bytes of the intended send times read then)."""
        self.subscribed = False
        self._opcodes = struct.pack("<H", Opcode.STATE) * 65536

    def feed(self, data: bytes, now: int) -> None:
        """Take what one recv returned at `now`."""
        buffer = self.buffer
        buffer += data
        size = self.frame_size
        whole = len(buffer) // size
        if whole and self._all_states(whole):
            self._take_states(whole, now)
            del buffer[: whole * size]
        else:
            self._take_frames(now)

    def _all_states(self, whole: int) -> bool:
        """Whether the buffer starts with `whole` STATE frames of the expected size."""
        if whole > 65536:
            return False
        view = memoryview(self.buffer)[: whole * self.frame_size]
        opcodes = view[4:].tobytes()[:: self.frame_size]  # the low byte of each opcode
        sizes_ok = _HEADER.unpack_from(self.buffer, (whole - 1) * self.frame_size)[4]
        view.release()
        return opcodes == self._opcodes[: whole * 2 : 2] and sizes_ok == self.frame_size - 12

    def _take_states(self, whole: int, now: int) -> None:
        """Record the intended send times (each frame's last 8 bytes) of `whole` frames."""
        size = self.frame_size
        view = memoryview(self.buffer)[: whole * size]
        if size % 8 == 0:
            stamps = view.cast("q")[(size - 8) // 8 :: size // 8].tobytes()
        else:
            stamps = b"".join(view[i * size + size - 8 : (i + 1) * size] for i in range(whole))
        self.last_seq = _SEQ.unpack_from(view, (whole - 1) * size + 12 + _STATE_SEQ_OFFSET)[0]
        view.release()
        self.chunks.append((now, stamps))
        self.count += whole
        self.last_read_ns = now

    def _take_frames(self, now: int) -> None:
        """Frame by frame (the SUBSCRIBE reply, or anything unexpected)."""
        buffer = self.buffer
        pos = 0
        while len(buffer) - pos >= 12:
            _, _, stream, opcode, size, _ = _HEADER.unpack_from(buffer, pos)
            stop = pos + 12 + size
            if stop > len(buffer):
                break
            if opcode == Opcode.STATE:
                self.chunks.append((now, bytes(buffer[stop - 8 : stop])))
                self.last_seq = _SEQ.unpack_from(buffer, pos + 12 + _STATE_SEQ_OFFSET)[0]
                self.count += 1
                self.last_read_ns = now
            elif stream == SUB_STREAM and not self.subscribed:
                reply = decode_message(opcode, bytes(buffer[pos + 12 : stop]))
                if not isinstance(reply, Ok):
                    raise RuntimeError(f"SUBSCRIBE failed: {reply!r}")
                self.subscribed = True
            pos = stop
        del buffer[:pos]


def subscriber_main(
    plan: Plan,
    ready: mp.Queue[int],
    stop_seq: mp.Value,
    results: mp.Queue[SubscriberResult],  # type: ignore[valid-type]
) -> None:  # pragma: no cover - runs in a child process
    """Subscribe, then read notifications until one of flush `stop_seq` (set by the parent)."""
    sock = socket.create_connection((plan.host, plan.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(0.1)  # to see `stop_seq` soon after the last notification
    sock.sendall(encode_message(Connect(ConnectMode.READ_ONLY, name="bench-sub"), 9))
    sock.sendall(encode_message(Subscribe(plan.kind_id), SUB_STREAM))
    reader = Reader(frame_size(plan.entities))
    heartbeat = encode_message(Heartbeat())
    beat_at = time.monotonic() + HEARTBEAT_S
    announced = False
    while True:
        if time.monotonic() >= beat_at:  # a sign of life, or the server closes a silent reader
            sock.sendall(heartbeat)
            beat_at = time.monotonic() + HEARTBEAT_S
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            data = None
        if data is not None:
            if not data:
                raise ConnectionError("the server closed the connection")
            reader.feed(data, time.monotonic_ns())
        if reader.subscribed and not announced:
            ready.put(1)
            announced = True
        target = stop_seq.value  # type: ignore[attr-defined]
        if target and reader.last_seq >= target:
            break
    sock.close()
    intended = array("q")
    latencies = array("q")
    for read_at, stamps in reader.chunks:
        chunk = array("q", stamps)
        intended.extend(chunk)
        latencies.extend(read_at - stamp for stamp in chunk)
    results.put(
        SubscriberResult(reader.count, reader.last_read_ns, intended.tobytes(), latencies.tobytes())
    )


# --- the writer process ----------------------------------------------------------------------


def name_width(entities: int) -> int:
    """The width of the entities' names: every row has one size, and every STATE frame a size
    that is a multiple of 8 (the subscribers read them at C speed)."""
    width = len(str(entities))
    while (12 + STATE_HEAD_SIZE + len(row_of(0, 0, width)) + 4 + 2 + 8) % 8:
        width += 1
    return width


def row_of(i: int, round_: int, width: int) -> bytes:
    """Entity `i`'s row in round `round_` (hp and score change with the round)."""
    values = [f"p{i:0{width}d}", i % 90, (1000 + i + round_) & 0xFFFF_FFFF, i, 1.5, -2.0,
              i * 0.5, i % 2 == 0, "red", round_]  # fmt: skip
    return PLAYER.codec.encode(values)


def frame_size(entities: int) -> int:
    """The size of every STATE frame of the run (header included)."""
    return 12 + STATE_HEAD_SIZE + len(row_of(0, 0, name_width(entities))) + 4 + 2 + 8


def op_prefixes(kind_id: int, entities: int) -> list[list[bytes]]:
    """For each entity, its two ASSERT sub-operations without the metadata value: op u8,
    body_len u32, kind_id, eid, data, then the u16 meta length (8)."""
    width = name_width(entities)
    prefixes = []
    for i in range(entities):
        eid = cdb.id_from_int(i)
        variants = []
        for round_ in (0, 1):
            row = row_of(i, round_, width)
            body = struct.pack("<H", kind_id) + eid + struct.pack("<I", len(row)) + row + _U16_8
            variants.append(_OP_HEAD.pack(Opcode.ASSERT, len(body) + 8) + body)
        prefixes.append(variants)
    return prefixes


def batch_of(prefixes: list[list[bytes]], first: int, count: int, stamps: list[int]) -> bytes:
    """One BATCH frame of writes first..first+count-1 (write k: entity k mod n, row k div n
    mod 2), write j stamped with `stamps[j]`."""
    n = len(prefixes)
    parts = [struct.pack("<I", count)]
    for j in range(count):
        k = first + j
        parts.append(prefixes[k % n][(k // n) % 2])
        parts.append(_META_NS.pack(stamps[j]))
    return encode_frame(Opcode.BATCH, 0, b"".join(parts))


def writer_main(
    plan: Plan,
    go: mp.Event,
    results: mp.Queue[WriterResult],  # type: ignore[valid-type]
) -> None:  # pragma: no cover - runs in a child process
    """Offer writes at the planned rate (or as fast as possible), then SYNC."""
    conn = WireConnection(plan.host, plan.port)
    conn.connect(ConnectMode.CLAIM, 1, name="bench-writer")
    prefixes = op_prefixes(plan.kind_id, plan.entities)
    go.wait()  # type: ignore[attr-defined]
    start = time.monotonic_ns()
    sent = 0
    if plan.rate:
        total = int(plan.rate * plan.seconds)
        step_ns = 1_000_000_000 / plan.rate
        tick = 0
        while sent < total:
            tick += 1
            tick_at = start + tick * 1_000_000
            due = min(total, int((tick_at - start) / step_ns))
            while sent < due:
                count = min(due - sent, 1000)
                stamps = [start + int((sent + j) * step_ns) for j in range(count)]
                conn.send(batch_of(prefixes, sent, count, stamps))
                sent += count
            delay = (tick_at - time.monotonic_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
        measured_from = start + int(WARMUP_S * 1e9)
    else:
        deadline = start + int(plan.seconds * 1e9)
        batches = 0
        while time.monotonic_ns() < deadline:
            now = time.monotonic_ns()
            conn.send(batch_of(prefixes, sent, 1000, [now] * 1000))
            sent += 1000
            batches += 1
            if batches % 20 == 0:
                conn.request(Sync(), Ok)
        measured_from = start
    last_seq = conn.request(Sync(), Ok).value
    conn.close()
    results.put(WriterResult(sent, start, measured_from, last_seq))


# --- one run ---------------------------------------------------------------------------------


@dataclass
class RunResult:
    notifications: int
    seconds: float
    latencies_ns: list[int]
    server_cpu_s: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(args: argparse.Namespace, workdir: Path, rate: int, seconds: float) -> RunResult:
    fsync = "--no-fsync" if args.no_fsync else "--fsync"
    server = start_server(workdir / "data", "--window-ms", str(args.window_ms), fsync)
    ctx = mp.get_context("spawn")
    processes: list[mp.process.BaseProcess] = []
    try:
        conn = WireConnection(server.host, server.port)
        conn.connect(ConnectMode.CLAIM, 1, name="bench-loader")  # the writer reclaims it
        kind_id = conn.create_kind()
        width = name_width(args.entities)
        for start in range(0, args.entities, 1000):
            ids = range(start, min(start + 1000, args.entities))
            rows = tuple(Assert(kind_id, cdb.id_from_int(i), row_of(i, 1, width)) for i in ids)
            conn.send(encode_message(Batch(rows)))
        conn.sync()
        conn.close()
        plan = Plan(server.host, server.port, kind_id, args.entities, rate, seconds)
        ready: mp.Queue[int] = ctx.Queue()
        stop_seq = ctx.Value("q", 0)
        sub_results: mp.Queue[SubscriberResult] = ctx.Queue()
        for _ in range(args.subscribers):
            process = ctx.Process(target=subscriber_main, args=(plan, ready, stop_seq, sub_results))
            process.start()
            processes.append(process)
        for _ in range(args.subscribers):
            ready.get(timeout=120)
        go = ctx.Event()
        writer_results: mp.Queue[WriterResult] = ctx.Queue()
        writer = ctx.Process(target=writer_main, args=(plan, go, writer_results))
        writer.start()
        processes.append(writer)
        time.sleep(0.5)  # the writer encodes its operations before the clock starts
        cpu_before = cpu_seconds(server.process.pid)
        go.set()
        written = writer_results.get(timeout=seconds + 300)
        stop_seq.value = written.last_seq  # the subscribers stop once they have it
        outcomes = [sub_results.get(timeout=300) for _ in range(args.subscribers)]
        server_cpu = cpu_seconds(server.process.pid) - cpu_before
    except BaseException:
        tail = server.log_path.read_text(errors="replace").splitlines()[-15:]
        print("\nserver log, last lines:\n" + "\n".join(tail), file=sys.stderr)
        raise
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
        server.stop()
    notifications = sum(o.notifications for o in outcomes)
    latencies: list[int] = []
    for outcome in outcomes:
        intended = array("q", outcome.intended_ns)
        latency = array("q", outcome.latencies_ns)
        counted = written.measured_from_ns
        latencies.extend(lat for at, lat in zip(intended, latency, strict=True) if at >= counted)
    elapsed = max(o.last_read_ns for o in outcomes) - written.first_send_ns
    expected = written.writes * args.subscribers
    if notifications < expected:
        raise RuntimeError(f"{notifications:,} notifications for {expected:,} expected")
    return RunResult(notifications, elapsed / 1e9, sorted(latencies), server_cpu)


# --- report ----------------------------------------------------------------------------------


def report_constant(args: argparse.Namespace, runs: list[RunResult]) -> None:
    rates = [r.notifications / r.seconds for r in runs]
    p50 = [percentile(r.latencies_ns, 50) / 1e6 for r in runs]
    p99 = [percentile(r.latencies_ns, 99) / 1e6 for r in runs]
    worst = [r.latencies_ns[-1] / 1e6 for r in runs]
    target = args.window_ms + LATENCY_SLACK_MS
    offered = args.rate * args.subscribers
    median, low, high = spread(rates)
    print(f"\nconstant rate: {args.rate:,} changes/s offered to {args.subscribers} subscribers"
          f" ({offered:,} notifications/s owed), {args.seconds:g} s per run")  # fmt: skip
    print(f"  delivered      {median:>10,.0f} notifications/s  (min {low:,.0f}, max {high:,.0f})")
    median, low, high = spread(p50)
    print(f"  latency p50    {median:>10.1f} ms  (min {low:.1f}, max {high:.1f})"
          f"   target <= {target:g} ms: {verdict(median <= target)}")  # fmt: skip
    median, low, high = spread(p99)
    print(f"  latency p99    {median:>10.1f} ms  (min {low:.1f}, max {high:.1f})"
          "   (reported, not held to a bound: this machine stalls)")  # fmt: skip
    median, low, high = spread(worst)
    print(f"  latency max    {median:>10.1f} ms  (min {low:.1f}, max {high:.1f})")
    samples = sum(len(r.latencies_ns) for r in runs) // len(runs)
    print(f"  (~{samples:,} latency samples per run, warm-up second excluded)")
    print(f"  server CPU     {spread([r.server_cpu_s / r.seconds for r in runs])[0]:>10.0%}")


def report_saturation(args: argparse.Namespace, runs: list[RunResult]) -> None:
    rates = [r.notifications / r.seconds for r in runs]
    median, low, high = spread(rates)
    print(f"\nsaturation: the writer as fast as the server takes it, {args.subscribers}"
          f" subscribers, {args.saturation_seconds:g} s per run")  # fmt: skip
    print(f"  delivered      {median:>10,.0f} notifications/s aggregate  (min {low:,.0f},"
          f" max {high:,.0f})   target >= {TARGET_AGGREGATE:,}:"
          f" {verdict(median >= TARGET_AGGREGATE)}")  # fmt: skip
    changes = [r.notifications / args.subscribers / r.seconds for r in runs]
    print(f"  that is        {spread(changes)[0]:>10,.0f} changes/s, each to every subscriber")
    print(f"  server CPU     {spread([r.server_cpu_s / r.seconds for r in runs])[0]:>10.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, 1 run each")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 3; quick 1)")
    parser.add_argument("--rate", type=int, default=20_000, help="offered changes/s")
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--entities", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=None, help="constant-rate run length")
    parser.add_argument("--saturation-seconds", type=float, default=None)
    parser.add_argument("--window-ms", type=int, default=20)
    parser.add_argument("--no-fsync", action="store_true", help="for comparison only")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.seconds = args.seconds or (4.0 if args.quick else 10.0)
    args.saturation_seconds = args.saturation_seconds or (3.0 if args.quick else 6.0)
    print(__doc__.split("\n\n    python")[0])
    print(f"\nserver code: {source_state()}")
    print(f"\n{args.subscribers} subscribers, {args.entities:,} entities,"
          f" window {args.window_ms} ms, fsync {'OFF' if args.no_fsync else 'on'},"
          f" {args.runs} runs")  # fmt: skip
    constant, saturated = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="cdb-fanout-") as tmp:
            constant.append(run_once(args, Path(tmp), args.rate, args.seconds))
        print(".", end="", flush=True, file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix="cdb-fanout-") as tmp:
            saturated.append(run_once(args, Path(tmp), 0, args.saturation_seconds))
        print(".", end="", flush=True, file=sys.stderr)
    report_constant(args, constant)
    report_saturation(args, saturated)


if __name__ == "__main__":
    main()
