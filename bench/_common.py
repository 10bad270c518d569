"""Shared pieces of the server benchmarks: the 10-field kind, a server subprocess, a blocking
raw-protocol client, a bulk loader, and percentile helpers.

The client speaks the wire protocol directly (frames built with the protocol package's
encoders, read with its FrameReader) over a plain blocking socket: the cheapest client Python
can offer, so that what is measured is mostly the server.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import convergedb as cdb
from convergedb.protocol import (
    Assert,
    Batch,
    Connect,
    Connected,
    ConnectMode,
    CreateKind,
    Error,
    Frame,
    FrameReader,
    KindInfo,
    Message,
    Ok,
    Query,
    QueryResult,
    QueryStatus,
    Sync,
    decode_message,
    encode_message,
)

ROOT = Path(__file__).resolve().parent.parent
"""The repository (the server runs from its venv's interpreter, this one)."""
START_TIMEOUT = 120.0
"""Seconds a server has to print its listening line (a 1M-entity load is slow)."""
STOP_TIMEOUT = 120.0
"""Seconds a server has to exit after SIGTERM."""
LISTENING = re.compile(r"^convergedb listening on (?P<host>\S+):(?P<port>\d+)")
LOADED = re.compile(r"loaded \d+ kinds and (?P<count>\d+) in-memory entities in (?P<s>[\d.]+)s")

M = TypeVar("M", bound=Message)


# --- the kind -------------------------------------------------------------------------------------


@cdb.kind("bench_player")
class Player:
    """A typical 10-field kind, used by every benchmark."""

    name: Annotated[str, cdb.String(0, max_length=32)] = ""
    level: Annotated[int, cdb.U16(1)] = 0
    hp: Annotated[int, cdb.U32(2)] = 0
    mana: Annotated[int, cdb.U32(3)] = 0
    x: Annotated[float, cdb.F32(4)] = 0.0
    y: Annotated[float, cdb.F32(5)] = 0.0
    z: Annotated[float, cdb.F32(6)] = 0.0
    online: Annotated[bool, cdb.Bool(7)] = False
    guild: Annotated[str, cdb.String(8, max_length=16, fixed=True)] = ""
    score: Annotated[int, cdb.I64(9)] = 0


PLAYER = cdb.kind_model(Player)


def player_row(i: int, round_: int = 0) -> bytes:
    """The row of entity `i` in write round `round_`: `hp` and `score` change every round, so
    each round's assert really changes the entity."""
    values = [
        f"player-{i}",
        i % 90,
        (1000 + i + round_) & 0xFFFF_FFFF,
        i & 0xFFFF_FFFF,
        1.5,
        -2.0,
        i * 0.5,
        i % 2 == 0,
        "red",
        round_,
    ]
    return PLAYER.codec.encode(values)


def batch_frame(kind_id: int, ids: Sequence[int], round_: int = 0) -> bytes:
    """One BATCH frame asserting entities `ids` (int ids) with their rows of `round_`."""
    ops = tuple(Assert(kind_id, cdb.id_from_int(i), player_row(i, round_)) for i in ids)
    return encode_message(Batch(ops))


# --- the raw client -------------------------------------------------------------------------------


class ServerReplyError(RuntimeError):
    """The server answered with an ERROR frame."""


class WireConnection:
    """One blocking TCP connection speaking raw frames.

    Not thread-safe for reading, but one thread may send while another reads (the ingest
    writers do that).
    """

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._reader = FrameReader(max_payload=0xFFFF_FFFF)
        self._frames: deque[Frame] = deque()
        self._streams = itertools.count(1)

    def next_stream(self) -> int:
        """A fresh non-zero stream id."""
        return next(self._streams) % 65535 + 1

    def send(self, data: bytes) -> None:
        """Send pre-encoded frames."""
        self.sock.sendall(data)

    def read_frame(self) -> Frame:
        """The next frame from the server (blocks)."""
        while not self._frames:
            data = self.sock.recv(262144)
            if not data:
                raise ConnectionError("the server closed the connection")
            self._frames.extend(self._reader.feed(data))
        return self._frames.popleft()

    def read_frame_polling(self) -> Frame:
        """The next frame, polling the socket in a busy loop instead of sleeping in the kernel:
        a round trip without this process's own wake-up (it burns a core meanwhile). Call
        `self.sock.setblocking(False)` first."""
        while not self._frames:
            try:
                data = self.sock.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                raise ConnectionError("the server closed the connection")
            self._frames.extend(self._reader.feed(data))
        return self._frames.popleft()

    def request(self, message: Message, expect: type[M]) -> M:
        """Send a request and return its reply; an ERROR (or a stray stream-0 ERROR) raises."""
        stream = self.next_stream()
        self.send(encode_message(message, stream))
        while True:
            frame = self.read_frame()
            if frame.stream_id not in (stream, 0):
                continue
            reply = decode_message(frame.opcode, frame.payload)
            if isinstance(reply, Error):
                raise ServerReplyError(f"{reply.code!r} (op 0x{reply.op:02x}): {reply.message}")
            if frame.stream_id == stream:
                if not isinstance(reply, expect):
                    raise ServerReplyError(f"expected {expect.__name__}, got {reply!r}")
                return reply

    def connect(
        self, mode: ConnectMode, source_id: int = 0, name: str = "bench", deadline_ms: int = 0
    ) -> Connected:
        """CONNECT; `deadline_ms` 0 declares the server's default liveness deadline."""
        connect = Connect(mode, source_id=source_id, name=name, liveness_deadline_ms=deadline_ms)
        return self.request(connect, Connected)

    def create_kind(self) -> int:
        """Register the bench kind; its kind id."""
        return self.request(CreateKind(PLAYER.definition), KindInfo).kind_id

    def sync(self) -> int:
        return self.request(Sync(), Ok).value

    def close(self) -> None:
        self.sock.close()


def writer_connection(
    host: str, port: int, source_id: int, deadline_ms: int = 0
) -> tuple[WireConnection, int]:
    """A connection that claimed `source_id` and registered the kind; (connection, kind id)."""
    conn = WireConnection(host, port)
    conn.connect(ConnectMode.CLAIM, source_id, f"bench-writer-{source_id}", deadline_ms)
    return conn, conn.create_kind()


def load_entities(
    host: str, port: int, count: int, *, source_id: int = 1, deadline_ms: int = 0
) -> float:
    """Assert entities 0..count-1 (round 0) in BATCH frames of 1,000 from one connection, then
    SYNC; returns the seconds it took. Encoding is interleaved with sending, so the client's
    work overlaps the server's. The entities expire one liveness deadline (`deadline_ms`, 0
    for the server's default) after the connection closes."""
    started = time.perf_counter()
    conn, kind_id = writer_connection(host, port, source_id, deadline_ms)
    try:
        chunk = 10_000
        for start in range(0, count, chunk):
            ids = range(start, min(start + chunk, count))
            conn.send(
                b"".join(batch_frame(kind_id, ids[i : i + 1000]) for i in range(0, len(ids), 1000))
            )
        conn.sync()
    finally:
        conn.close()
    return time.perf_counter() - started


# --- the server -----------------------------------------------------------------------------------


@dataclass
class ServerHandle:
    """A `convergedb serve` subprocess."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    started_at: float
    """time.perf_counter() just before the process was spawned."""
    log_offset: int = 0
    """Where this start's lines begin in the log file (restarts append to it)."""
    host: str = ""
    port: int = 0
    listening_at: float = 0.0
    """time.perf_counter() when its listening line was read."""
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @property
    def startup_seconds(self) -> float:
        """From spawning the process to reading its listening line."""
        return self.listening_at - self.started_at

    def status(self) -> dict[str, int]:
        """The kB figures of /proc/PID/status (VmRSS, RssAnon, RssFile, ...)."""
        figures: dict[str, int] = {}
        text = Path(f"/proc/{self.process.pid}/status").read_text()
        for line in text.splitlines():
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                figures[name] = int(parts[0]) * 1024
        return figures

    def load_log_seconds(self) -> float | None:
        """The load time the server logged at start-up ("loaded ... in X s"), if found."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            match = LOADED.search(log.read().decode(errors="replace"))
        return float(match["s"]) if match else None

    def stop(self) -> int:
        """SIGTERM and wait (SIGKILL after STOP_TIMEOUT); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(data_dir: Path, *args: str) -> ServerHandle:
    """Start `convergedb serve` on `data_dir` (any free port, admin off) and wait until it
    listens. Its stderr (the log) goes to a file beside the data directory."""
    command = [
        sys.executable,
        "-m",
        "convergedb",
        "serve",
        "--port",
        "0",
        "--admin-port",
        "0",
        "--data-dir",
        str(data_dir),
        *args,
    ]
    log_path = data_dir.parent / f"{data_dir.name}-server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("ab") as log:
        offset = log.tell()
        started = time.perf_counter()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env
        )
    server = ServerHandle(process, data_dir, log_path, started, offset)
    threading.Thread(target=_drain, args=(process, server._lines), daemon=True).start()
    deadline = started + START_TIMEOUT
    while True:
        try:
            line = server._lines.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            server.stop()
            raise RuntimeError(f"the server did not listen within {START_TIMEOUT} s") from None
        if line is None:
            raise RuntimeError(f"the server exited ({process.wait()}); see {log_path}")
        match = LISTENING.match(line)
        if match:
            server.listening_at = time.perf_counter()
            server.host, server.port = match["host"], int(match["port"])
            return server


def _drain(process: subprocess.Popen[bytes], lines: queue.Queue[str | None]) -> None:
    """Read the server's stdout for as long as it runs (so it never blocks on a full pipe)."""
    assert process.stdout is not None
    for raw in process.stdout:
        lines.put(raw.decode(errors="replace"))
    lines.put(None)


def source_state() -> str:
    """Which server code is measured: the commit, and a digest of uncommitted changes to src/."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    diff = git("diff", "HEAD", "--", "src")
    if not diff:
        return f"commit {commit}"
    digest = hashlib.sha1(diff.encode()).hexdigest()[:10]
    return f"commit {commit} + uncommitted changes to src/ (diff sha1 {digest})"


# --- statistics -----------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of sorted values, linearly interpolated."""
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)


def verdict(ok: bool) -> str:
    """What to print next to a target."""
    return "met" if ok else "MISSED"


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of `size` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --- helpers of the epoch and liveness benchmarks -------------------------------------------------


def assert_entities(
    conn: WireConnection, kind_id: int, ids: Sequence[int], *, round_: int = 0, batch: int = 1000
) -> None:
    """Assert entities `ids` (rows of `round_`) from `conn` in BATCH frames of `batch`,
    pipelined 10 frames per send, then SYNC (so they are flushed when this returns)."""
    for group in chunks(ids, batch * 10):
        conn.send(b"".join(batch_frame(kind_id, part, round_) for part in chunks(group, batch)))
    conn.sync()


def query_statuses(conn: WireConnection, kind_id: int, ids: Sequence[int]) -> list[QueryStatus]:
    """The QUERY status of each entity of `ids`, pipelined (up to 10,000 queries in flight)."""
    statuses: list[QueryStatus] = []
    for group in chunks(ids, 10_000):
        streams: dict[int, int] = {}
        frames = []
        for index, i in enumerate(group):
            stream = conn.next_stream()
            streams[stream] = index
            frames.append(encode_message(Query(kind_id, cdb.id_from_int(i)), stream))
        conn.send(b"".join(frames))
        found: list[QueryStatus | None] = [None] * len(group)
        left = len(group)
        while left:
            frame = conn.read_frame()
            index = streams.pop(frame.stream_id, -1)
            reply = decode_message(frame.opcode, frame.payload)
            if isinstance(reply, Error):
                raise ServerReplyError(f"{reply.code!r} (op 0x{reply.op:02x}): {reply.message}")
            if index < 0 or not isinstance(reply, QueryResult):
                continue
            found[index] = reply.status
            left -= 1
        statuses.extend(s for s in found if s is not None)
    return statuses


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server's admin port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def admin_get(host: str, port: int, path: str) -> bytes:
    """GET an admin endpoint of a server started with --admin-port."""
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=30) as reply:
        body: bytes = reply.read()
    return body


def wait_checkpointed(host: str, admin_port: int, timeout: float = 600.0) -> float:
    """Wait until the server's checkpointer has moved its whole log into the entity table (it
    works in the background after a load, on the other core); returns the seconds waited."""
    started = time.perf_counter()
    while json.loads(admin_get(host, admin_port, "/v1/status"))["log_backlog"]:
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"the checkpointer did not catch up in {timeout:.0f} s")
        time.sleep(0.05)
    return time.perf_counter() - started
