"""The command-line tool, run as a subprocess against a real server (`--json` output checked)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

from convergedb import id_from_int, id_from_str
from convergedb.protocol import Assert, ConnectMode, CreateKind, KindInfo
from kinds import PLAYER, Player, Vec2
from server_fixture import ServerProcess, running_server
from wire_client import WireClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "convergedb", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def cli_json(*args: str) -> Any:
    status, out, err = await cli(*args, "--json")
    assert status == 0, err
    return json.loads(out)


async def populated(server: ServerProcess) -> int:
    c = await WireClient.open(server.host, server.port)
    await c.connect(ConnectMode.CLAIM, source_id=5, name="writer-5")
    info = await c.request(CreateKind(PLAYER.definition))
    assert isinstance(info, KindInfo)
    c.send(
        Assert(
            info.kind_id, id_from_int(42), PLAYER.encode(Player("ana", 9, Vec2(1, 2), True, [3]))
        )
    )
    c.send(Assert(info.kind_id, id_from_str("bob"), PLAYER.encode(Player("bob"))))
    await c.sync()
    return info.kind_id


async def test_kinds_and_get(server: ServerProcess) -> None:
    await populated(server)
    port = str(server.port)
    kinds = await cli_json("kinds", "--port", port)
    player = next(k for k in kinds if k["name"] == "player")
    assert [f["name"] for f in player["fields"]] == ["name", "hp", "pos", "alive", "items"]
    assert player["fields"][4]["type"] == "array<u32>[16]"

    entity = await cli_json("get", "player", "42", "--port", port)
    assert entity["status"] == "ALIVE" and entity["version"] == 1 and entity["sources"] == [5]
    assert entity["value"] == {
        "name": "ana",
        "hp": 9,
        "pos": {"x": 1.0, "y": 2.0},
        "alive": True,
        "items": [3],
    }
    by_name = await cli_json("get", "player", "bob", "--port", port)
    assert by_name["value"]["name"] == "bob"
    missing = await cli_json("get", "player", "7", "--port", port)
    assert missing["status"] == "NOT_FOUND"

    status, out, _ = await cli("get", "player", "42", "--port", port)
    assert status == 0 and "ALIVE" in out and "'ana'" in out
    status, _, err = await cli("get", "nothing", "1", "--port", port)
    assert status == 1 and "no kind named 'nothing'" in err


async def test_status(tmp_path: Path) -> None:
    admin = free_port()
    async with running_server(tmp_path, "--admin-port", str(admin)) as server:
        await populated(server)
        state = await cli_json("status", "--admin-port", str(admin))
        (source,) = [s for s in state["sources"] if s["source_id"] == 5]
        assert source["state"] in ("connected", "grace")  # the test client may be gone already
        player = next(k for k in state["kinds"] if k["name"] == "player")
        assert player["entities"] == 2 and player["tombstones"] == 0
        status, out, _ = await cli("status", "--admin-port", str(admin))
        assert status == 0 and "player" in out and "entities" in out


async def test_a_server_that_is_not_there(tmp_path: Path) -> None:
    port = str(free_port())
    status, _, err = await cli("kinds", "--port", port)
    assert status == 1 and "cannot reach the server" in err


async def test_backup_while_the_server_runs_then_restore(
    server: ServerProcess, tmp_path: Path
) -> None:
    await populated(server)
    copy = tmp_path / "backup"
    status, out, err = await cli("backup", "--data-dir", str(server.data_dir), str(copy))
    assert status == 0 and "backed up" in out, err
    (tmp_path / "restored").mkdir()
    async with running_server(tmp_path / "restored", data_dir=copy) as restored:
        entity = await cli_json("get", "player", "42", "--port", str(restored.port))
        assert entity["status"] == "ALIVE" and entity["value"]["name"] == "ana"
    status, _, err = await cli("backup", "--data-dir", str(server.data_dir), str(copy))
    assert status == 1 and "not empty" in err
    status, _, err = await cli(
        "backup", "--data-dir", str(tmp_path / "nothing"), str(tmp_path / "b2")
    )
    assert status == 1 and "holds no ConvergeDB store" in err
