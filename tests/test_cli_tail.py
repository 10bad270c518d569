"""`convergedb watch` and `convergedb events`, run as subprocesses against a real server.

A test starts the command, waits for its first line (the server accepted the subscription) or
its bootstrap-complete line, and only then writes: no sleeps.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import convergedb as cdb
from kinds import Player, Vec2
from server_fixture import ServerProcess
from test_cli import cli

TIMEOUT = 30.0


@cdb.kind("tail_log", event_stream=True)
class Log:
    name: Annotated[str, cdb.String(0, max_length=16)] = ""
    hp: Annotated[int, cdb.U32(1)] = 0


class Tail:
    """A running `convergedb watch` / `events` subprocess whose stdout is read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def line(self) -> str:
        """The next line of stdout (fails if the command ended)."""
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), TIMEOUT)
        if not raw:
            raise AssertionError(f"the command ended: {await self.stderr()}")
        return raw.decode().rstrip("\n")

    async def json_line(self) -> dict[str, Any]:
        """The next line, parsed as JSON."""
        parsed: dict[str, Any] = json.loads(await self.line())
        return parsed

    async def json_until(self, line_type: str) -> list[dict[str, Any]]:
        """The next JSON lines, up to and including the first of `line_type`."""
        lines = [await self.json_line()]
        while lines[-1]["type"] != line_type:
            lines.append(await self.json_line())
        return lines

    async def finish(self) -> tuple[int, list[str]]:
        """Wait for the command to exit: its status and the lines it printed meanwhile."""
        out, _ = await asyncio.wait_for(self.process.communicate(), TIMEOUT)
        assert self.process.returncode is not None
        return self.process.returncode, out.decode().splitlines()

    async def stderr(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode()


@asynccontextmanager
async def tail(*args: str) -> AsyncIterator[Tail]:
    """Run `convergedb ARGS` in the background; killed on exit if it is still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "convergedb", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        yield Tail(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_watch_bootstraps_then_follows_live_changes(server: ServerProcess) -> None:
    port = str(server.port)
    async with cdb.connect(*server.address, name="writer") as writer:
        players = await writer.register_kind(Player)
        await players.assert_(42, Player("ana", 9, Vec2(1, 2), True, [3]))
        await players.assert_("bob", Player("bob", 5))
        await writer.sync()

        args = ("watch", "player", "--bootstrap", "--count", "3", "--json", "--port", port)
        async with tail(*args) as watch:
            first, begin, *entities, complete = await watch.json_until("BOOTSTRAP_COMPLETE")
            assert first["type"] == "SUBSCRIBED" and first["kind"] == "player"
            assert begin == {"type": "BOOTSTRAP_BEGIN", "mode": "FULL", "count": 2}
            assert complete == {"type": "BOOTSTRAP_COMPLETE", "mode": "FULL", "count": 2}
            by_name = {e["value"]["name"]: e for e in entities}
            ana = by_name["ana"]
            assert ana["type"] == "BOOTSTRAP" and ana["version"] == 1
            assert ana["entity_id"] == cdb.id_from_int(42).hex()
            assert ana["sources"] == [writer.source_id]
            assert ana["value"] == {
                "name": "ana",
                "hp": 9,
                "pos": {"x": 1.0, "y": 2.0},
                "alive": True,
                "items": [3],
            }

            meta = cdb.encode_metadata({"actor": "test"})
            await players.patch(42, hp=75, meta=meta)
            await writer.sync()
            await players.assert_("cy", Player("cy"))
            await writer.sync()
            await players.retract("bob")
            status, lines = await watch.finish()

    assert status == 0
    updated, created, deleted = (json.loads(line) for line in lines)
    assert updated["type"] == "UPDATED" and updated["version"] == 2
    assert updated["changed_fields"] == ["hp"] and updated["value"]["hp"] == 75
    assert updated["metadata"] == {"actor": "test"} and updated["meta"] == meta.hex()
    assert created["type"] == "CREATED" and created["value"]["name"] == "cy"
    assert deleted["type"] == "DELETED" and deleted["cause"] == "RETRACTED"
    assert deleted["entity_id"] == cdb.id_from_str("bob").hex() and deleted["value"] is None


async def test_watch_for_people_shows_changed_fields_and_previous_values(
    server: ServerProcess,
) -> None:
    port = str(server.port)
    async with cdb.connect(*server.address) as writer:
        players = await writer.register_kind(Player)
        await players.assert_(7, Player("ana", 9))
        await writer.sync()
        async with tail(
            "watch", "player", "--include-previous", "--count", "2", "--port", port
        ) as w:
            assert (await w.line()).startswith("watching player")
            await players.patch(7, hp=75)
            await writer.sync()
            await players.retract(7)
            status, lines = await w.finish()
    assert status == 0
    updated, deleted = lines
    assert updated.startswith("UPDATED") and "0x07" in updated
    assert "changed hp: 9 -> 75" in updated and "v2" in updated
    assert deleted.startswith("DELETED") and "cause retracted" in deleted


async def test_watch_count_zero_dumps_the_kind_and_exits(server: ServerProcess) -> None:
    async with cdb.connect(*server.address) as writer:
        players = await writer.register_kind(Player)
        await players.assert_(1, Player("ana"))
        await writer.sync()
    status, out, err = await cli(
        "watch", "player", "--bootstrap", "--count", "0", "--port", str(server.port)
    )
    assert status == 0, err
    assert "BOOTSTRAP" in out and "name='ana'" in out and "bootstrap complete: 1 entity" in out


async def test_watch_errors(server: ServerProcess) -> None:
    port = str(server.port)
    status, _, err = await cli("watch", "nothing", "--port", port)
    assert status == 1 and "no kind named 'nothing'" in err
    async with cdb.connect(*server.address) as writer:
        await writer.register_kind(Player)
        status, _, err = await cli(
            "watch", "player", "--count", "1", "--timeout", "0.3", "--port", port
        )
    assert status == 1 and "timed out after 0.3 s: 0 of 1" in err
    status, _, err = await cli("watch", "player", "--timeout", "0.3", "--port", port)
    assert status == 0, err


async def test_events_from_a_sequence_number_then_live(server: ServerProcess) -> None:
    port = str(server.port)
    async with cdb.connect(*server.address) as writer:
        logs = await writer.register_kind(Log)
        await logs.assert_(1, Log("ana", 9))
        await logs.patch(1, hp=75)
        await logs.retract(1)
        await writer.sync()

        status, out, err = await cli(
            "events", "tail_log", "--from", "2", "--count", "2", "--json", "--port", port
        )
        assert status == 0, err
        first, patched, retracted = (json.loads(line) for line in out.splitlines())
        assert first == {
            "type": "SUBSCRIBED",
            "kind": "tail_log",
            "kind_id": logs.kind_id,
            "next_seq": 2,
        }
        assert patched["type"] == "EVENT" and patched["seq"] == 2 and patched["op"] == "PATCH"
        assert patched["data"] == {"hp": 75} and patched["source_id"] == writer.source_id
        assert patched["cause"] == "CLIENT_WRITE"
        assert retracted["seq"] == 3 and retracted["op"] == "RETRACT" and retracted["data"] is None

        async with tail("events", "tail_log", "--count", "1", "--json", "--port", port) as live:
            subscribed = await live.json_line()
            assert subscribed["type"] == "SUBSCRIBED" and subscribed["next_seq"] == 4
            await logs.assert_(2, Log("bo", 1))
            status, lines = await live.finish()
        assert status == 0
        (asserted,) = (json.loads(line) for line in lines)
        assert asserted["seq"] == 4 and asserted["op"] == "ASSERT"
        assert asserted["data"] == {"name": "bo", "hp": 1}

        status, out, err = await cli(
            "events", "tail_log", "--from", "1", "--count", "1", "--port", port
        )
        assert status == 0, err
        assert "#1" in out and "ASSERT" in out and "name='ana' hp=9" in out


async def test_events_of_a_kind_without_an_event_stream(server: ServerProcess) -> None:
    async with cdb.connect(*server.address) as writer:
        await writer.register_kind(Player)
    status, _, err = await cli("events", "player", "--port", str(server.port))
    assert status == 1 and "keeps no event stream" in err
