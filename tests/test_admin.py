"""The admin endpoint (/metrics, /health, /v1/status), logs, configuration and shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    Batch,
    Connect,
    ConnectMode,
    CreateKind,
    Error,
    ErrorCode,
    KindInfo,
    Ok,
    Query,
    QueryResult,
    QueryStatus,
    Retract,
    Subscribe,
)
from kinds import PLAYER, Player
from server_fixture import ServerProcess, running_server
from wire_client import WireClient

ROW = PLAYER.encode(Player(name="m"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, bytes]:
    def fetch() -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    return await asyncio.to_thread(fetch)


async def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_move_as_writes_happen(tmp_path: Path) -> None:
    port = free_port()
    async with running_server(tmp_path, "--admin-port", str(port)) as server:
        before = await metrics(port)
        assert before[("convergedb_writes_total", (("op", "assert"),))] == 0
        c = await WireClient.open(server.host, server.port)
        await c.connect(ConnectMode.CLAIM, source_id=1)
        info = await c.request(CreateKind(PLAYER.definition))
        assert isinstance(info, KindInfo)
        watcher = await WireClient.open(server.host, server.port)
        await watcher.connect(ConnectMode.READ_ONLY)
        assert isinstance(await watcher.request(Subscribe(info.kind_id)), Ok)
        c.send(Batch(tuple(Assert(info.kind_id, id_from_int(i), ROW) for i in range(10))))
        await c.sync()
        c.send(Retract(info.kind_id, id_from_int(0)))
        c.send(Assert(info.kind_id, id_from_int(99), ROW[:-1]))
        await c.expect_async_error(ErrorCode.INVALID_DATA)
        await c.sync()
        after = await metrics(port)
        # the 10 asserts, and the server's assert of the writer's presence entity
        assert after[("convergedb_writes_total", (("op", "assert"),))] == 11
        assert after[("convergedb_writes_total", (("op", "retract"),))] == 1
        assert after[("convergedb_rejected_writes_total", (("code", "INVALID_DATA"),))] == 1
        assert after[("convergedb_entities", (("kind", "player"),))] == 9
        assert after[("convergedb_tombstones", (("kind", "player"),))] == 1
        assert after[("convergedb_connections", (("role", "writer"),))] == 1
        assert after[("convergedb_connections", (("role", "reader"),))] == 1
        assert after[("convergedb_flushes_total", ())] > before[("convergedb_flushes_total", ())]
        assert after[("convergedb_flush_duration_seconds_count", ())] >= 2
        assert after[("convergedb_subscriptions", ())] == 1
        assert after[("convergedb_notifications_total", ())] == 11  # 10 created, 1 deleted
        assert after[("convergedb_pending_merged", ())] == 0
        await c.close()
        grace = await metrics(port)
        assert grace[("convergedb_sources_in_grace", ())] == 1


async def test_health_and_status(tmp_path: Path) -> None:
    port = free_port()
    async with running_server(tmp_path, "--admin-port", str(port)) as server:
        c = await WireClient.open(server.host, server.port)
        await c.connect(ConnectMode.CLAIM, source_id=3, name="game-3")
        await c.sync()
        status, body = await get(port, "/health")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = await get(port, "/v1/status")
        state: dict[str, Any] = json.loads(body)
        assert state["connections"] == {"writers": 1, "readers": 0}
        (source,) = state["sources"]
        assert (source["source_id"], source["state"], source["name"]) == (3, "connected", "game-3")
        presence = next(k for k in state["kinds"] if k["name"] == "convergedb_connections")
        assert presence["entities"] == 1 and presence["system"]
        status, _ = await get(port, "/nothing")
        assert status == 404


async def test_json_logs(tmp_path: Path) -> None:
    async with running_server(tmp_path, "--log-format", "json", "--log-level", "debug") as server:
        c = await WireClient.open(server.host, server.port)
        await c.connect(ConnectMode.CLAIM, source_id=1, name="logger")
        await c.sync()
        await c.close()
    lines = [line for line in server.stderr_path.read_text().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert any("connected" in e["message"] and e["logger"] == "convergedb.server" for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def serve_help() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "convergedb", "serve", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return result.stdout


def test_serve_help_shows_every_default() -> None:
    text = " ".join(serve_help().split())
    for flag, default in [
        ("--port", "default: 3727"), ("--window-ms", "default: 20"), ("--data-dir", "./data"),
        ("--tombstone-retention", "default: 300"), ("--max-liveness-ms", "default: 300000"),
        ("--subscriber-buffer", "default: 4096"), ("--event-ring", "default: 65536"),
        ("--admin-port", "default: 9727"), ("--max-connections", "default: 10000"),
    ]:  # fmt: skip
        assert flag in text and default in text, flag


async def test_tokens_come_from_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "convergedb.toml"
    config.write_text('[serve]\ntoken = ["reader:look", "writer:w:4"]\n')
    (tmp_path / "run").mkdir()
    async with running_server(tmp_path / "run", "--config", str(config)) as server:
        refused = await WireClient.open(server.host, server.port)
        refused.send(Connect(ConnectMode.ALLOCATE), 1)
        _, reply = await refused.reply(1)
        assert isinstance(reply, Error) and reply.code == ErrorCode.AUTH_FAILED
        writer = await WireClient.open(server.host, server.port)
        assert (await writer.connect(ConnectMode.ALLOCATE, auth_token="w")).source_id == 4


def test_invalid_settings_get_a_clear_error(tmp_path: Path) -> None:
    for args, message in [
        (["--port", "70000"], "70000"),
        (["--token", "boss:x"], "unknown role 'boss'"),
        (["--token", "reader:x:1"], "only writer tokens"),
        (["--config", str(_config(tmp_path, "colour = 'blue'\n"))], "unknown settings colour"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "convergedb", "serve", "--data-dir", str(tmp_path), *args],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 2, result
        assert message in result.stderr, result.stderr


async def test_settings_come_from_flags_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "convergedb.toml"
    config.write_text("[serve]\nwindow-ms = 7\nmax-liveness-ms = 1111\nevent-ring = 9\n")

    async def connected_deadline(env: dict[str, str], *args: str) -> int:
        import os

        os.environ.update(env)
        try:
            async with running_server(
                tmp_path / str(len(env)) / str(len(args)), "--config", str(config), *args
            ) as server:
                c = await WireClient.open(server.host, server.port)
                reply = await c.connect(ConnectMode.ALLOCATE, liveness_deadline_ms=60_000)
                await c.close()
                return reply.liveness_deadline_ms * 1000 + reply.window_ms
        finally:
            for key in env:
                os.environ.pop(key)

    (tmp_path / "0" / "0").mkdir(parents=True)
    assert await connected_deadline({}) == 1111 * 1000 + 7  # the file
    (tmp_path / "1" / "0").mkdir(parents=True)
    assert await connected_deadline({"CONVERGEDB_WINDOW_MS": "8"}) == 1111 * 1000 + 8  # env
    (tmp_path / "1" / "2").mkdir(parents=True)
    assert (
        await connected_deadline({"CONVERGEDB_WINDOW_MS": "8"}, "--window-ms", "9")
        == 1111 * 1000 + 9
    )


async def test_sigterm_under_load_keeps_every_synced_write(server: ServerProcess) -> None:
    c = await WireClient.open(server.host, server.port)
    await c.connect(ConnectMode.CLAIM, source_id=1)
    info = await c.request(CreateKind(PLAYER.definition))
    assert isinstance(info, KindInfo)
    synced = 0
    for round_number in range(20):
        c.send(
            Batch(
                tuple(
                    Assert(info.kind_id, id_from_int(round_number * 100 + i), ROW)
                    for i in range(100)
                )
            )
        )
        await c.sync()
        synced = (round_number + 1) * 100
    for round_number in range(20, 40):  # still sending when SIGTERM arrives
        c.send(
            Batch(
                tuple(
                    Assert(info.kind_id, id_from_int(round_number * 100 + i), ROW)
                    for i in range(100)
                )
            )
        )
    status = await server.stop()
    assert status == 0
    await server.start()
    log = server.stderr_path.read_text().split("=== start 2")[-1]
    assert "loaded" in log
    r = await WireClient.open(server.host, server.port)
    await r.connect(ConnectMode.READ_ONLY)
    for i in range(0, synced, 37):
        result = await r.request(Query(info.kind_id, id_from_int(i)))
        assert isinstance(result, QueryResult) and result.status is QueryStatus.ALIVE
