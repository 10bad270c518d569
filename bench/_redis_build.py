"""What a team without ConvergeDB hand-builds on Redis, for bench/compare_redis.py: the Lua
script that every write runs, and a `redis-server` subprocess on a loopback port.

The Redis build keeps, per entity, one hash `<kind>:<id>` holding the ten fields (as strings)
and three bookkeeping fields: `_v` (the version), `_s0` and `_s1` (the 64-bit source set as two
32-bit halves: Lua's `bit` library works on 32-bit integers). Every write is one EVALSHA of
`WRITE_SCRIPT`, which does what ConvergeDB does per write:

- ASSERT (`A`): sets the caller's bit. When the entity is alive and the ten fields are
  identical to what is stored, only the source set may change: nothing is published (so writers
  may re-assert for free). Otherwise the version goes up by one, the hash is written, and the
  new state is PUBLISHed (`C` created or re-created, `U` updated).
- RETRACT (`R`): clears the caller's bit (a no-op when it was not set). When no bit is left the
  entity becomes a tombstone (the hash keeps only its version and an empty source set, and
  expires after the tombstone retention, like ConvergeDB's compaction) and `D` is published.

Messages are the fields joined by the unit separator (0x1F): `C|U, id, version, stamp, ten
values` or `D, id, version, stamp`, where the stamp is the send time of the write that caused
the change (for the latency measurement; ConvergeDB carries it as the write's metadata).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FIELDS = ("name", "level", "hp", "mana", "x", "y", "z", "online", "guild", "score")
"""The hash fields of an entity, in the kind's ordinal order."""
SEPARATOR = "\x1f"
TOMBSTONE_MS = 300_000
"""How long a tombstone is kept (ConvergeDB's default tombstone retention)."""


def write_script(channel: str) -> str:
    """The Lua script of one write.

    KEYS[1] = the entity's hash; ARGV = op ('A' or 'R'), source id (0..63), entity id and the
    write's stamp (both only for the message), then for an ASSERT the ten field values. Returns
    1 when the write changed the entity (and published), else 0.
    """
    names = ", ".join(f"'{name}'" for name in FIELDS)
    sets = ", ".join(f"'{name}', ARGV[{5 + j}]" for j, name in enumerate(FIELDS))
    return f"""
local key = KEYS[1]
local src = tonumber(ARGV[2])
local cur = redis.call('HMGET', key, '_v', '_s0', '_s1', {names})
local ver = tonumber(cur[1]) or 0
local s0 = tonumber(cur[2]) or 0
local s1 = tonumber(cur[3]) or 0
local alive = s0 ~= 0 or s1 ~= 0
local low = src < 32
local mask
if low then mask = bit.lshift(1, src) else mask = bit.lshift(1, src - 32) end
if ARGV[1] == 'A' then
  local n0, n1 = s0, s1
  if low then n0 = bit.bor(s0, mask) else n1 = bit.bor(s1, mask) end
  local changed = not alive
  if alive then
    for j = 1, {len(FIELDS)} do
      if cur[j + 3] ~= ARGV[j + 4] then
        changed = true
        break
      end
    end
  end
  if not changed then
    if n0 ~= s0 or n1 ~= s1 then redis.call('HSET', key, '_s0', n0, '_s1', n1) end
    return 0
  end
  ver = ver + 1
  redis.call('HSET', key, '_v', ver, '_s0', n0, '_s1', n1, {sets})
  local what = 'U'
  if not alive then
    what = 'C'
    redis.call('PERSIST', key)
  end
  redis.call('PUBLISH', '{channel}', what .. '\\31' .. ARGV[3] .. '\\31' .. ver .. '\\31'
    .. table.concat(ARGV, '\\31', 4, {4 + len(FIELDS)}))
  return 1
end
if low then
  if bit.band(s0, mask) == 0 then return 0 end
  s0 = bit.band(s0, bit.bnot(mask))
else
  if bit.band(s1, mask) == 0 then return 0 end
  s1 = bit.band(s1, bit.bnot(mask))
end
if s0 ~= 0 or s1 ~= 0 then
  redis.call('HSET', key, '_s0', s0, '_s1', s1)
  return 0
end
ver = ver + 1
redis.call('DEL', key)
redis.call('HSET', key, '_v', ver, '_s0', 0, '_s1', 0)
redis.call('PEXPIRE', key, {TOMBSTONE_MS})
redis.call('PUBLISH', '{channel}', 'D' .. '\\31' .. ARGV[3] .. '\\31' .. ver .. '\\31' .. ARGV[4])
return 1
"""


def source_set_of(s0: bytes | str | int, s1: bytes | str | int) -> int:
    """The u64 source set of the two stored halves (signed 32-bit numbers in Lua)."""
    return (int(s0) & 0xFFFF_FFFF) | (int(s1) & 0xFFFF_FFFF) << 32


# --- the server -----------------------------------------------------------------------------------


def ensure_redis_server() -> str:
    """The path of `redis-server`; installs Debian's package first when it is missing."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )
    if found:
        return found
    print("redis-server is not installed: installing it (apt-get install -y redis-server)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    prefixes: list[list[str]] = [[]]  # as we are (root here), then through sudo
    if shutil.which("sudo"):
        prefixes.append(["sudo", "-n"])
    for prefix in prefixes:
        for update_first in (False, True):
            if update_first:
                subprocess.run([*prefix, "apt-get", "update"], env=env, capture_output=True)
            done = subprocess.run(
                [*prefix, "apt-get", "install", "-y", "redis-server"],
                env=env,
                capture_output=True,
                text=True,
            )
            found = shutil.which("redis-server") or (
                "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
            )
            if done.returncode == 0 and found:
                how = " ".join([*prefix, "apt-get install -y redis-server"])
                print(f"installed redis-server with `{how}`")
                return found
    sys.exit(
        "redis-server is missing and could not be installed (apt-get install -y redis-server, "
        "with and without sudo, failed): install it and run the benchmark again"
    )


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class RedisServer:
    """A `redis-server` subprocess."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    version: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def redis_settings(appendfsync: str = "everysec") -> tuple[tuple[str, str], ...]:
    """How the Redis build is configured: durable through its append-only file, fsync'd once a
    second by default (its usual production setting; `always` fsyncs before answering, like
    ConvergeDB's fsync per flush), no RDB snapshots (no fork during the run), and no limit on a
    subscriber's output buffer (Redis's default cuts a subscriber that is 32 MB behind, which
    would leave its mirror wrong for good)."""
    return (
        ("appendonly", "yes"),
        ("appendfsync", appendfsync),
        ("save", ""),
        ("client-output-buffer-limit", "pubsub 0 0 0"),
    )


def describe_settings(appendfsync: str = "everysec") -> str:
    return ", ".join(
        f"{name} {value!r}" if not value else f"{name} {value}"
        for name, value in redis_settings(appendfsync)
    )


def start_redis(binary: str, workdir: Path, appendfsync: str = "everysec") -> RedisServer:
    """Start `redis-server` on a free loopback port with its data in `workdir`; returns once it
    answers PING."""
    import redis  # the bench extra

    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "redis.log"
    for _attempt in range(5):
        port = free_port()
        command = [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--logfile",
            str(log_path),
        ]
        for name, value in redis_settings(appendfsync):
            command += [f"--{name}", value]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            try:
                info = client.info("server")
                client.close()
                return RedisServer(process, port, log_path, str(info["redis_version"]))
            except redis.ConnectionError:
                time.sleep(0.05)
        if process.poll() is None:
            process.kill()
        process.wait()
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise RuntimeError(f"redis-server did not start; its log:\n{tail}")
