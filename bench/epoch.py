"""Source epoch reconciliation: how long EPOCH_END takes to retract what was not re-asserted.

Method: a fresh server per run (fsync on, the default; window 20 ms unless --window-ms). The
writer is THIS benchmark process, on one raw-protocol connection that CLAIMs source 1: it
asserts N entities of the 10-field kind (BATCHes of 1,000, then SYNC), sends EPOCH_BEGIN
(whose OK value, the baseline size, must be N), then re-asserts 90% of them with the SAME rows
(every id except those with id % 10 == 9, as a writer would replay an unchanged snapshot) in
BATCHes of 100, with a SYNC barrier every --sync-every batches and at the end. Then it sends
EPOCH_END and, in the same send, a SYNC, and times from just before that send to
  (a) the EPOCH_END OK (its value, the retracted count, must be N/10: checked), and
  (b) the SYNC's OK = the flush that carries the N/10 retractions has committed (fsync'd).
Afterwards it checks by QUERY that every dropped entity is a tombstone and every kept one is
alive. Figures are medians over the runs, with min and max.

    python bench/epoch.py [--quick] [--runs N] [--entities N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    WireConnection,
    assert_entities,
    batch_frame,
    chunks,
    query_statuses,
    source_state,
    spread,
    start_server,
)
from convergedb.protocol import (
    Connect,
    Connected,
    ConnectMode,
    EpochBegin,
    EpochEnd,
    Error,
    Ok,
    QueryStatus,
    Sync,
    decode_message,
    encode_message,
)

BATCH_SIZE = 100
"""ASSERTs per BATCH frame of the re-assertion."""
SOURCE_ID = 1


@dataclass
class RunResult:
    """What one run measured (seconds)."""

    load_s: float
    begin_s: float
    baseline: int
    reassert_s: float
    end_ok_s: float
    end_sync_s: float
    retracted: int


def dropped(i: int) -> bool:
    """Whether entity `i` is left out of the new snapshot (10% of the ids)."""
    return i % 10 == 9


def reassert(conn: WireConnection, kind_id: int, ids: list[int], sync_every: int) -> None:
    """Re-assert `ids` (unchanged rows) in BATCHes of BATCH_SIZE, a SYNC every `sync_every`
    batches and at the end; the frames of a group are encoded and sent together."""
    group = BATCH_SIZE * sync_every
    for part in chunks(ids, group):
        conn.send(b"".join(batch_frame(kind_id, b) for b in chunks(part, BATCH_SIZE)))
        conn.sync()


def end_epoch(conn: WireConnection) -> tuple[float, float, int]:
    """Send EPOCH_END and a SYNC together; (seconds to the EPOCH_END OK, seconds to the SYNC
    OK, the EPOCH_END OK value)."""
    end_stream = conn.next_stream()
    sync_stream = conn.next_stream()
    frames = encode_message(EpochEnd(), end_stream) + encode_message(Sync(), sync_stream)
    started = time.perf_counter()
    conn.send(frames)
    end_at = sync_at = 0.0
    value = -1
    while not (end_at and sync_at):
        frame = conn.read_frame()
        arrived = time.perf_counter()
        reply = decode_message(frame.opcode, frame.payload)
        if isinstance(reply, Error):
            raise RuntimeError(f"server ERROR {reply.code!r}: {reply.message}")
        if not isinstance(reply, Ok):
            continue
        if frame.stream_id == end_stream:
            end_at, value = arrived, reply.value
        elif frame.stream_id == sync_stream:
            if not end_at:
                raise RuntimeError("the SYNC after EPOCH_END was answered before EPOCH_END")
            sync_at = arrived
    return end_at - started, sync_at - started, value


def check_outcome(conn: WireConnection, kind_id: int, entities: int) -> None:
    """Every dropped entity is a tombstone, every re-asserted one alive."""
    statuses = query_statuses(conn, kind_id, range(entities))
    wrong = [
        i
        for i, status in enumerate(statuses)
        if status != (QueryStatus.TOMBSTONE if dropped(i) else QueryStatus.ALIVE)
    ]
    if wrong:
        raise RuntimeError(
            f"{len(wrong)} entities in the wrong state after EPOCH_END, e.g. {wrong[:5]}"
            f" ({[statuses[i].name for i in wrong[:5]]})"
        )


def run_once(args: argparse.Namespace, workdir: Path) -> RunResult:
    """Start a fresh server, run the epoch, check it, stop the server."""
    server = start_server(workdir / "data", "--window-ms", str(args.window_ms), "--fsync")
    try:
        conn = WireConnection(server.host, server.port)
        try:
            conn.request(Connect(ConnectMode.CLAIM, SOURCE_ID, name="bench-epoch"), Connected)
            kind_id = conn.create_kind()
            everything = list(range(args.entities))
            started = time.perf_counter()
            assert_entities(conn, kind_id, everything)
            load_s = time.perf_counter() - started

            started = time.perf_counter()
            baseline = conn.request(EpochBegin(), Ok).value
            begin_s = time.perf_counter() - started
            if baseline != args.entities:
                raise RuntimeError(f"EPOCH_BEGIN baseline {baseline}, expected {args.entities}")

            kept = [i for i in everything if not dropped(i)]
            started = time.perf_counter()
            reassert(conn, kind_id, kept, args.sync_every)
            reassert_s = time.perf_counter() - started

            end_ok_s, end_sync_s, retracted = end_epoch(conn)
            expected = args.entities - len(kept)
            if retracted != expected:
                raise RuntimeError(f"EPOCH_END retracted {retracted}, expected {expected}")
            check_outcome(conn, kind_id, args.entities)
        finally:
            conn.close()
    finally:
        server.stop()
    return RunResult(load_s, begin_s, baseline, reassert_s, end_ok_s, end_sync_s, retracted)


def report(runs: list[RunResult], args: argparse.Namespace) -> None:
    """The per-run table and the medians."""
    print()
    print(f"{'run':>4} {'load s':>7} {'BEGIN ms':>9} {'re-assert s':>12} {'END OK ms':>10}"
          f" {'END+SYNC ms':>12} {'retracted':>10}")  # fmt: skip
    for n, run in enumerate(runs, 1):
        print(
            f"{n:>4} {run.load_s:>7.2f} {run.begin_s * 1e3:>9.1f} {run.reassert_s:>12.2f}"
            f" {run.end_ok_s * 1e3:>10.1f} {run.end_sync_s * 1e3:>12.1f} {run.retracted:>10,}"
        )
    print()
    kept = sum(1 for i in range(args.entities) if not dropped(i))
    lines = (
        ("EPOCH_END -> its OK (retractions queued)", [r.end_ok_s * 1e3 for r in runs], "ms"),
        ("EPOCH_END -> SYNC OK (retraction flush committed)", [r.end_sync_s * 1e3 for r in runs],
         "ms"),
        ("EPOCH_BEGIN -> its OK (baseline recorded)", [r.begin_s * 1e3 for r in runs], "ms"),
        (f"re-assertion of {kept:,} unchanged entities", [kept / r.reassert_s for r in runs],
         "asserts/s"),
    )  # fmt: skip
    for label, values, unit in lines:
        median, low, high = spread(values)
        print(f"{label}: {median:,.1f} {unit}  (min {low:,.1f}, max {high:,.1f})")
    print(
        f"\nEvery run: baseline {args.entities:,}, EPOCH_END OK value {args.entities - kept:,}"
        " as expected; dropped entities are tombstones and kept ones alive (QUERY of all)."
    )
    print(
        "The END+SYNC figure is what a writer waits for before its phantom entities are durably"
        " gone; it includes up to one coalescing window of waiting for the flush to start."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="10,000 entities, 3 runs")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 5; quick 3)")
    parser.add_argument("--entities", type=int, default=None, help="default 100,000")
    parser.add_argument("--sync-every", type=int, default=100, help="batches between SYNCs")
    parser.add_argument("--window-ms", type=int, default=20)
    args = parser.parse_args()
    args.runs = args.runs or (3 if args.quick else 5)
    args.entities = args.entities or (10_000 if args.quick else 100_000)
    print(__doc__.split("\n\n    python")[0])
    print(f"\nserver code: {source_state()}")
    print(
        f"\n{args.entities:,} entities, 90% re-asserted in BATCHes of {BATCH_SIZE} with a SYNC"
        f" every {args.sync_every} batches, window {args.window_ms} ms, fsync on,"
        f" {args.runs} runs (a fresh server each)"
    )
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="cdb-epoch-") as tmp:
            runs.append(run_once(args, Path(tmp)))
        print(".", end="", flush=True, file=sys.stderr)
    report(runs, args)


if __name__ == "__main__":
    main()
