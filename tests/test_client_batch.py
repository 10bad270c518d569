"""The client SDK against a real server: batches of writes sent as BATCH frames."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated

import pytest

import convergedb as cdb
from convergedb.protocol import Assert, Opcode, QueryStatus
from server_fixture import ServerProcess, running_server


@cdb.kind("unit")
class Unit:
    name: Annotated[str, cdb.String(0, max_length=64)] = ""
    hp: Annotated[int, cdb.U32(1)] = 0
    tags: Annotated[list[int], cdb.Array(2, cdb.U16(), max_count=32)] = []


@cdb.kind("match")
class Match:
    map_name: Annotated[str, cdb.String(0, max_length=32)] = ""
    players: Annotated[int, cdb.U8(1)] = 0


@cdb.kind("blob")
class Blob:
    data: Annotated[bytes, cdb.Bytes(0, max_length=65_535)] = b""


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[cdb.Client]:
    async with cdb.connect(server.host, server.port) as client:
        yield client


async def test_a_batch_across_two_kinds(client: cdb.Client) -> None:
    units = await client.register_kind(Unit)
    matches = await client.register_kind(Match)
    await units.assert_("old", Unit("old"))
    await client.sync()
    async with client.batch() as batch:
        for number in range(10):
            batch.assert_(units, number, Unit(f"unit {number}", hp=number, tags=[number]))
        batch.assert_(matches, "m1", Match("dust", 2), meta=b"created")
        batch.patch(units, 3, hp=300)
        batch.patch(matches, "m1", {"players": 4})
        batch.retract(units, "old")
        assert len(batch) == 14
        assert batch.size > 0
    assert len(batch) == 0
    await client.sync()
    for number in range(10):
        expected = Unit(f"unit {number}", hp=300 if number == 3 else number, tags=[number])
        assert (await units.query(number)).value == expected
    assert (await matches.query("m1")).value == Match("dust", 4)
    assert (await units.query("old")).status is QueryStatus.TOMBSTONE


async def test_flush_sends_what_was_added_so_far(client: cdb.Client) -> None:
    units = await client.register_kind(Unit)
    async with client.batch() as batch:
        batch.assert_(units, 1, Unit("first"))
        await batch.flush()
        assert len(batch) == 0
        await client.sync()
        assert (await units.query(1)).value == Unit("first")
        batch.assert_(units, 2, Unit("second"))
        await batch.flush()
        await batch.flush()  # an empty flush sends nothing
    await client.sync()
    assert (await units.query(2)).value == Unit("second")


async def test_an_exception_in_the_block_discards_the_batch(client: cdb.Client) -> None:
    units = await client.register_kind(Unit)
    with pytest.raises(RuntimeError, match="boom"):
        async with client.batch() as batch:
            batch.assert_(units, 1, Unit("flushed"))
            await batch.flush()
            batch.assert_(units, 2, Unit("discarded"))
            raise RuntimeError("boom")
    await client.sync()
    assert (await units.query(1)).alive
    assert not (await units.query(2)).found


async def test_a_value_that_does_not_fit_is_refused_when_added(client: cdb.Client) -> None:
    units = await client.register_kind(Unit)
    async with client.batch() as batch:
        batch.assert_(units, 1, Unit("ok"))
        with pytest.raises(cdb.InvalidData, match="hp"):
            batch.assert_(units, 2, Unit("bad", hp=-1))
        with pytest.raises(cdb.InvalidData, match="tags"):
            batch.patch(units, 3, tags=list(range(33)))
        assert len(batch) == 1
    await client.sync()
    assert (await units.query(1)).alive
    assert not (await units.query(2)).found
    assert not (await units.query(3)).found


async def test_a_batch_bigger_than_max_payload_is_split(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, "--max-payload", "65536") as server,
        cdb.connect(server.host, server.port) as client,
    ):
        assert client.max_payload == 65_536
        units = await client.register_kind(Unit)
        count = 3000
        async with client.batch() as batch:
            for number in range(count):
                batch.assert_(units, number, Unit(f"unit number {number:08}", hp=number))
            assert batch.size > 3 * 65_536
        # had a frame been above the maximum, the server would have closed the connection
        await client.sync()
        for number in (0, 1, count // 2, count - 1):
            assert (await units.query(number)).value == Unit(f"unit number {number:08}", number)


async def test_a_single_write_above_max_payload_is_refused(tmp_path: Path) -> None:
    async with (
        running_server(tmp_path, "--max-payload", "65536") as server,
        cdb.connect(server.host, server.port) as client,
    ):
        blobs = await client.register_kind(Blob)
        with pytest.raises(cdb.PayloadTooLarge, match="maximum payload of 65536"):
            await blobs.assert_(1, Blob(bytes(65_535)))
        with pytest.raises(cdb.PayloadTooLarge):
            client.batch().assert_(blobs, 1, Blob(bytes(65_535)))
        await blobs.assert_(2, Blob(bytes(60_000)))
        await client.sync()
        assert (await blobs.query(2)).value == Blob(bytes(60_000))
        assert not (await blobs.query(1)).found


async def test_a_pending_rejection_is_raised_by_flush_and_keeps_the_batch(
    server: ServerProcess,
) -> None:
    rejected = asyncio.Event()
    async with cdb.connect(server.host, server.port, on_error=lambda _: rejected.set()) as client:
        units = await client.register_kind(Unit)
        bad_row = Assert(units.kind_id, cdb.id_from_int(9), b"\x01").encode()
        batch = client.batch()
        batch.assert_(units, 1, Unit("kept"))
        await client.connection.send_payload(Opcode.ASSERT, bad_row)
        async with asyncio.timeout(10):
            await rejected.wait()
        with pytest.raises(cdb.WriteRejected):
            await batch.flush()
        assert len(batch) == 1
        await batch.flush()
        await client.sync()
        assert (await units.query(1)).value == Unit("kept")
