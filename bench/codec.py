"""Codec throughput: raw-row validation, row encode/decode, frame parsing (ops/s).

A typical 10-field kind (ints, floats, a bool, a fixed and a variable string). Each figure is
the median of several runs of a fixed number of operations, with the spread (min..max), because
this machine stalls now and then.

    python bench/codec.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import convergedb as cdb
from _common import Player
from convergedb.protocol import Assert, FrameReader, Opcode, encode_frame, iter_batch
from convergedb.protocol.messages import Batch


def measure(label: str, ops: int, body: Callable[[], None], runs: int) -> None:
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        body()
        rates.append(ops / (time.perf_counter() - start))
    print(
        f"{label:<44} {statistics.median(rates):>12,.0f} ops/s"
        f"   (min {min(rates):,.0f}, max {max(rates):,.0f}, {runs} runs)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--ops", type=int, default=50_000)
    args = parser.parse_args()
    model = cdb.kind_model(Player)
    codec = model.codec
    players = [
        Player(f"player-{i}", i % 90, 1000 + i, i, 1.5, -2.0, i * 0.5, i % 2 == 0, "red", i)
        for i in range(args.ops)
    ]
    rows = [model.encode(p) for p in players]
    values = [model.to_values(p) for p in players]

    def validate() -> None:
        for row in rows:
            codec.validate(row)

    def encode_rows() -> None:
        for v in values:
            codec.encode(v)

    def decode_rows() -> None:
        for row in rows:
            codec.decode(row)

    eids = [cdb.id_from_int(i) for i in range(args.ops)]
    frames = b"".join(
        encode_frame(Opcode.ASSERT, 0, Assert(1, eid, row).encode())
        for eid, row in zip(eids, rows, strict=True)
    )
    batches = [
        encode_frame(
            Opcode.BATCH,
            0,
            Batch(tuple(Assert(1, eids[j], rows[j]) for j in range(i, i + 100))).encode(),
        )
        for i in range(0, args.ops, 100)
    ]
    chunk = 64 * 1024

    def parse_frames() -> None:
        reader = FrameReader()
        for i in range(0, len(frames), chunk):
            for frame in reader.feed(frames[i : i + chunk]):
                Assert.decode(frame.payload)

    def parse_batches() -> None:
        reader = FrameReader()
        for batch in batches:
            for frame in reader.feed(batch):
                for _op, body in iter_batch(frame.payload):
                    Assert.decode(body)

    print(f"row: {codec.fixed_size}-byte fixed zone, {len(rows[0])} bytes typical")
    measure("raw row validation (10 fields)", args.ops, validate, args.runs)
    measure("row encode from values", args.ops, encode_rows, args.runs)
    measure("row decode to values", args.ops, decode_rows, args.runs)
    measure("ASSERT frames: read + decode (64 KiB chunks)", args.ops, parse_frames, args.runs)
    measure("BATCH of 100 ASSERTs: read + decode, per op", args.ops, parse_batches, args.runs)


if __name__ == "__main__":
    main()
