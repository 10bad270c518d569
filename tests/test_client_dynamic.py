"""Dynamic kinds: `client.kind(name)` gives a handle from the server's own schema whose values
are dicts by field name; it reads, subscribes, mirrors and writes (on a writer client) like a
typed handle, and the typed path sees the same entities."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import pytest

import convergedb as cdb
from convergedb.client import DynamicKindHandle, DynamicModel
from convergedb.protocol.messages import KindInfo
from convergedb.schema.types import Field, FieldType, KindDef
from kinds import Player, Vec2
from server_fixture import ServerProcess

TIMEOUT = 15.0


@cdb.struct
class Slot:
    item: Annotated[int, cdb.U32(0)] = 0
    count: Annotated[int, cdb.U8(1)] = 0
    label: Annotated[str, cdb.String(2, max_length=8, fixed=True)] = ""


@cdb.kind("dyn_bag", event_stream=True)
class Bag:
    owner: Annotated[str, cdb.String(0, max_length=32)] = ""
    slots: Annotated[list[Slot], cdb.Array(1, Slot, max_count=4)] = []
    blob: Annotated[bytes, cdb.Bytes(2, max_length=8)] = b""
    big: Annotated[int, cdb.U128(3)] = 0
    weight: Annotated[float, cdb.F64(4)] = 0.0


ANA = Player("ana", 9, Vec2(1, 2), True, [3, 4])
ANA_RECORD = {"name": "ana", "hp": 9, "pos": {"x": 1.0, "y": 2.0}, "alive": True, "items": [3, 4]}


async def test_reads_decode_to_dicts(server: ServerProcess) -> None:
    async with (
        cdb.connect(*server.address) as writer,
        cdb.connect(*server.address, read_only=True) as reader,
    ):
        players = await writer.register_kind(Player)
        await players.assert_("ana", ANA)
        await writer.sync()

        dynamic = await reader.kind("player")
        assert isinstance(dynamic, DynamicKindHandle)
        assert dynamic.name == "player" and dynamic.kind_id == players.kind_id
        assert dynamic.field_names == ("name", "hp", "pos", "alive", "items")
        result = await dynamic.query("ana")
        assert result.alive and result.version == 1 and result.sources == [writer.source_id]
        assert result.value == ANA_RECORD
        assert (await dynamic.query("nobody")).value is None


async def test_writes_from_dicts_with_missing_fields_as_zero(server: ServerProcess) -> None:
    async with cdb.connect(*server.address) as writer:
        typed = await writer.register_kind(Player)
        players = await writer.kind("player")
        assert players.writable
        await players.assert_("bo", {"name": "bo", "pos": {"y": 5.0}})
        await players.patch("ana", {"hp": 3, "items": [7]})
        async with writer.batch() as batch:
            batch.assert_(players, "cy", {"name": "cy", "alive": True})
            batch.patch(players, "bo", hp=12)
        await writer.sync()

        assert (await typed.query("bo")).value == Player("bo", 12, Vec2(0.0, 5.0), False, [])
        assert (await typed.query("ana")).value == Player("", 3, Vec2(), False, [7])
        assert (await typed.query("cy")).value == Player("cy", 0, Vec2(), True, [])
        assert (await players.query("bo")).value == {
            "name": "bo",
            "hp": 12,
            "pos": {"x": 0.0, "y": 5.0},
            "alive": False,
            "items": [],
        }


async def test_structs_arrays_bytes_and_big_integers_round_trip(server: ServerProcess) -> None:
    record = {
        "owner": "ana",
        "slots": [{"item": 7, "count": 2, "label": "sword"}, {"item": 9}],
        "blob": b"\x00\x01",
        "big": 2**100,
        "weight": 1.5,
    }
    async with cdb.connect(*server.address) as writer:
        typed = await writer.register_kind(Bag)
        bags = await writer.kind("dyn_bag")
        await bags.assert_(1, record)
        await writer.sync()
        expected = {**record, "slots": [record["slots"][0], {"item": 9, "count": 0, "label": ""}]}
        assert (await bags.query(1)).value == expected
        assert (await typed.query(1)).value == Bag(
            "ana", [Slot(7, 2, "sword"), Slot(9, 0, "")], b"\x00\x01", 2**100, 1.5
        )


async def test_values_that_do_not_fit_are_refused_before_sending(server: ServerProcess) -> None:
    async with cdb.connect(*server.address) as writer:
        await writer.register_kind(Bag)
        bags = await writer.kind("dyn_bag")
        with pytest.raises(cdb.InvalidData, match="no field 'color'"):
            await bags.assert_(1, {"owner": "ana", "color": 3})
        with pytest.raises(cdb.InvalidData, match="no sub-field 'size'"):
            await bags.assert_(1, {"slots": [{"size": 3}]})
        with pytest.raises(cdb.InvalidData, match="slots"):
            await bags.patch(1, slots=[1, 2])
        with pytest.raises(cdb.InvalidData, match="owner"):
            await bags.patch(1, owner=12)
        with pytest.raises(cdb.InvalidData, match="at least one field"):
            await bags.patch(1, {})
        with pytest.raises(TypeError, match="dict by field name"):
            await bags.assert_(1, ["ana"])  # type: ignore[arg-type]
        await writer.sync()  # nothing was sent, so nothing was rejected


async def test_a_read_only_client_cannot_write(server: ServerProcess) -> None:
    async with (
        cdb.connect(*server.address) as writer,
        cdb.connect(*server.address, read_only=True) as reader,
    ):
        await writer.register_kind(Player)
        players = await reader.kind("player")
        assert not players.writable
        with pytest.raises(cdb.ReadOnlyError, match="read-only client"):
            await players.assert_("ana", ANA_RECORD)
        with pytest.raises(cdb.ReadOnlyError):
            await players.patch("ana", hp=1)
        with pytest.raises(cdb.UnknownKind):
            await reader.kind("no_such_kind")


async def test_subscriptions_and_mirrors_yield_dicts(server: ServerProcess) -> None:
    async with (
        cdb.connect(*server.address) as writer,
        cdb.connect(*server.address, read_only=True) as reader,
    ):
        typed = await writer.register_kind(Player)
        await typed.assert_("ana", ANA)
        await writer.sync()
        players = await reader.kind("player")
        async with (
            players.subscribe(include_previous=True) as changes,
            cdb.Mirror(players) as mirror,
        ):
            await mirror.wait_synced(TIMEOUT)
            assert mirror.get("ana") == ANA_RECORD
            await typed.patch("ana", hp=75)
            seen: list[cdb.Change[dict[str, Any]]] = []
            async with asyncio.timeout(TIMEOUT):
                async for item in changes:
                    if isinstance(item, cdb.Change):
                        seen.append(item)
                    if isinstance(item, cdb.Change) and item.type is cdb.ChangeType.UPDATED:
                        break
            bootstrap, update = seen
            assert bootstrap.type is cdb.ChangeType.BOOTSTRAP and bootstrap.value == ANA_RECORD
            assert update.value == {**ANA_RECORD, "hp": 75}
            assert update.previous == ANA_RECORD
            assert update.changed_field_names == ("hp",)
            await writer.sync()
            await mirror.wait_seq(update.seq, TIMEOUT)
            assert mirror.get("ana") == {**ANA_RECORD, "hp": 75}


async def test_events_carry_dicts(server: ServerProcess) -> None:
    async with (
        cdb.connect(*server.address) as writer,
        cdb.connect(*server.address, read_only=True) as reader,
    ):
        typed = await writer.register_kind(Bag)
        await typed.assert_(1, Bag("ana"))
        await typed.patch(1, slots=[Slot(1, 1, "a")], big=5)
        await typed.retract(1)
        await writer.sync()
        bags = await reader.kind("dyn_bag")
        events = []
        async with asyncio.timeout(TIMEOUT), bags.subscribe_events(from_seq=1) as stream:
            async for event in stream:
                events.append(event)
                if len(events) == 3:
                    break
        assigned, patched, retracted = events
        assert assigned.op is cdb.EventOp.ASSERT and assigned.value is not None
        assert assigned.value["owner"] == "ana"
        assert patched.fields == {"slots": [{"item": 1, "count": 1, "label": "a"}], "big": 5}
        assert retracted.op is cdb.EventOp.RETRACT and retracted.data is None


def test_the_model_follows_a_schema_that_grew() -> None:
    """A dynamic handle refreshed with a wider definition (after a reconnection) decodes and
    writes the new fields too."""
    name = Field(0, "name", FieldType.STRING, max_length=16)
    level = Field(1, "level", FieldType.U8)
    first = KindInfo(3, 1, KindDef("grown", (name,)))
    grown = KindInfo(3, 2, KindDef("grown", (name, level)))

    class FakeClient:
        read_only = False

    handle = DynamicKindHandle(FakeClient(), first)  # type: ignore[arg-type]
    assert handle.field_names == ("name",)
    handle.refresh(grown)
    assert isinstance(handle.model, DynamicModel)
    assert handle.field_names == ("name", "level") and handle.writable
    row = handle.model.encode({"name": "ana", "level": 4})
    assert handle.decode(row) == {"name": "ana", "level": 4}
