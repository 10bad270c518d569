"""The client SDK against a real server: kinds, the three writes, queries, rejected writes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import pytest

import convergedb as cdb
from client_helpers import Errors
from convergedb.protocol import Assert, ErrorCode, Opcode, QueryStatus
from server_fixture import ServerProcess

TIMEOUT = 10.0


@cdb.struct
class Vec3:
    x: Annotated[float, cdb.F32(0)] = 0.0
    y: Annotated[float, cdb.F32(1)] = 0.0
    z: Annotated[float, cdb.F32(2)] = 0.0


@cdb.struct
class Slot:
    item_id: Annotated[int, cdb.U32(0)] = 0
    count: Annotated[int, cdb.U16(1)] = 0


@cdb.kind("player")
class Player:
    name: Annotated[str, cdb.String(0, max_length=32)] = ""
    hp: Annotated[int, cdb.U16(1)] = 0
    pos: Annotated[Vec3, cdb.Struct(2)] = Vec3()
    inventory: Annotated[list[int], cdb.Array(3, cdb.U32(), max_count=64)] = []
    slots: Annotated[list[Slot], cdb.Array(4, Slot, max_count=8)] = []


@cdb.kind("building")
class BuildingV1:
    owner: Annotated[str, cdb.String(0, max_length=16)] = ""
    level: Annotated[int, cdb.U8(1)] = 0


@cdb.kind("building")
class BuildingV2:
    owner: Annotated[str, cdb.String(0, max_length=16)] = ""
    level: Annotated[int, cdb.U8(1)] = 0
    damaged: Annotated[bool, cdb.Bool(2)] = False


@cdb.kind("building")
class BuildingConflict:
    owner: Annotated[str, cdb.String(0, max_length=16)] = ""
    level: Annotated[int, cdb.U16(1)] = 0


ANA = Player(
    name="ana",
    hp=90,
    pos=Vec3(1.5, -2.0, 3.25),
    inventory=[7, 8, 9],
    slots=[Slot(100, 2), Slot(200, 1)],
)


@pytest.fixture
async def errors() -> Errors:
    return Errors()


@pytest.fixture
async def client(server: ServerProcess, errors: Errors) -> AsyncIterator[cdb.Client]:
    async with cdb.connect(server.host, server.port, name="tests", on_error=errors) as client:
        yield client


@pytest.fixture
async def players(client: cdb.Client) -> cdb.KindHandle[Player]:
    return await client.register_kind(Player)


def bit(client: cdb.Client) -> int:
    assert client.source_id is not None
    return 1 << client.source_id


# --- kinds ----------------------------------------------------------------------------------


async def test_register_kind_gives_a_handle(client: cdb.Client) -> None:
    players = await client.register_kind(Player)
    assert players.name == "player"
    assert players.schema_version == 1
    assert isinstance(players.kind_id, int)
    assert players.model is cdb.kind_model(Player)
    assert players.writable
    again = await client.register_kind(Player)
    assert again.kind_id == players.kind_id
    assert again.schema_version == 1


async def test_appending_fields_bumps_the_schema_version(client: cdb.Client) -> None:
    v1 = await client.register_kind(BuildingV1)
    v2 = await client.register_kind(BuildingV2)
    assert v2.kind_id == v1.kind_id
    assert (v1.schema_version, v2.schema_version) == (1, 2)


async def test_a_conflicting_schema_is_refused(client: cdb.Client) -> None:
    await client.register_kind(BuildingV1)
    with pytest.raises(cdb.SchemaConflictError) as caught:
        await client.register_kind(BuildingConflict)
    assert isinstance(caught.value, cdb.SchemaConflict)
    assert caught.value.code == ErrorCode.SCHEMA_CONFLICT
    assert caught.value.op == Opcode.CREATE_KIND


async def test_resolve_kind(client: cdb.Client, server: ServerProcess) -> None:
    players = await client.register_kind(Player)
    async with cdb.connect(server.host, server.port, read_only=True) as reader:
        resolved = await reader.resolve_kind(Player)
        assert resolved.kind_id == players.kind_id
        assert resolved.writable


async def test_resolving_an_unknown_kind(client: cdb.Client) -> None:
    with pytest.raises(cdb.UnknownKind):
        await client.resolve_kind(Player)


async def test_an_older_declaration_resolves_read_only(client: cdb.Client) -> None:
    v2 = await client.register_kind(BuildingV2)
    await v2.assert_(1, BuildingV2("ana", 3, damaged=True))
    await client.sync()
    v1 = await client.resolve_kind(BuildingV1)
    assert v1.kind_id == v2.kind_id
    assert not v1.writable
    result = await v1.query(1)
    assert result.value == BuildingV1("ana", 3)
    with pytest.raises(cdb.ReadOnlyHandle, match="declares only 2"):
        await v1.assert_(2, BuildingV1("bob", 1))
    with pytest.raises(cdb.ReadOnlyHandle):
        await v1.patch(1, level=4)
    with pytest.raises(cdb.ReadOnlyHandle):
        await v1.retract(1)


async def test_a_newer_declaration_than_the_server_does_not_resolve(client: cdb.Client) -> None:
    await client.register_kind(BuildingV1)
    with pytest.raises(cdb.SchemaConflictError):
        await client.resolve_kind(BuildingV2)


async def test_list_kinds(client: cdb.Client) -> None:
    players = await client.register_kind(Player)
    kinds = {info.kind.name: info for info in await client.list_kinds()}
    assert kinds["player"].kind_id == players.kind_id
    assert kinds["player"].kind == cdb.kind_model(Player).definition
    assert kinds["player"].schema_version == 1


async def test_a_read_only_client_cannot_register(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, read_only=True) as reader:
        with pytest.raises(cdb.ReadOnlyError):
            await reader.register_kind(Player)


# --- writes and queries ---------------------------------------------------------------------


async def test_assert_then_query_round_trips(
    client: cdb.Client, players: cdb.KindHandle[Player]
) -> None:
    await players.assert_("player:ana", ANA, meta=b"login")
    await client.sync()
    result = await players.query("player:ana")
    assert result.status is QueryStatus.ALIVE
    assert result.alive and result.found
    assert result.value == ANA
    assert result.version == 1
    assert result.source_set == bit(client)
    assert result.sources == [client.source_id]


async def test_every_kind_of_entity_id(client: cdb.Client, players: cdb.KindHandle[Player]) -> None:
    keys: list[cdb.client.EntityKey] = [42, "forty-two", uuid.UUID(int=42), b"\x2a"]
    for number, key in enumerate(keys):
        await players.assert_(key, Player(name=str(number)))
    await client.sync()
    for number, key in enumerate(keys[1:3], start=1):
        assert (await players.query(key)).value == Player(name=str(number))
    # b"\x2a" zero-padded is the id of the int 42: the last write to it wins
    assert (await players.query(42)).value == Player(name="3")


async def test_querying_a_missing_entity(players: cdb.KindHandle[Player]) -> None:
    result = await players.query("nobody")
    assert result.status is QueryStatus.NOT_FOUND
    assert not result.found and not result.alive
    assert result.value is None
    assert (result.version, result.source_set) == (0, 0)


async def test_an_identical_assert_changes_nothing(
    client: cdb.Client, players: cdb.KindHandle[Player]
) -> None:
    await players.assert_(1, ANA)
    first = await client.sync()
    await players.assert_(1, ANA)
    assert await client.sync() == first
    assert (await players.query(1)).version == 1


async def test_patch_changes_only_the_named_fields(
    client: cdb.Client, players: cdb.KindHandle[Player]
) -> None:
    await players.assert_(1, ANA)
    await client.sync()
    await players.patch(1, hp=75)
    await client.sync()
    result = await players.query(1)
    assert result.value == Player(ANA.name, 75, ANA.pos, ANA.inventory, ANA.slots)
    assert result.version == 2
    await players.patch(1, {"pos": Vec3(0, 0, 1)}, inventory=[])
    await client.sync()
    result = await players.query(1)
    assert result.value == Player(ANA.name, 75, Vec3(0, 0, 1), [], ANA.slots)


async def test_patching_a_missing_entity_creates_it_with_zeros(
    client: cdb.Client, players: cdb.KindHandle[Player]
) -> None:
    await players.patch("new", name="fresh")
    await client.sync()
    result = await players.query("new")
    assert result.value == Player(name="fresh")
    assert result.version == 1


async def test_a_patch_needs_a_field(players: cdb.KindHandle[Player]) -> None:
    with pytest.raises(cdb.InvalidData):
        await players.patch(1)
    with pytest.raises(AttributeError, match="no field 'mana'"):
        await players.patch(1, mana=3)
    with pytest.raises(TypeError, match="both"):
        await players.patch(1, {"hp": 1}, hp=2)


async def test_retract_leaves_a_tombstone(
    client: cdb.Client, players: cdb.KindHandle[Player]
) -> None:
    await players.assert_(1, ANA)
    await client.sync()
    await players.retract(1, meta=b"logout")
    await client.sync()
    result = await players.query(1)
    assert result.status is QueryStatus.TOMBSTONE
    assert result.found and not result.alive
    assert result.value is None
    assert result.version == 2
    assert result.source_set == 0


async def test_sync_returns_increasing_seqs(
    client: cdb.Client, players: cdb.KindHandle[Player]
) -> None:
    await players.assert_(1, ANA)
    first = await client.sync()
    await players.patch(1, hp=1)
    second = await client.sync()
    await players.patch(1, hp=2)
    third = await client.sync()
    assert first < second < third
    assert await client.sync() == third  # nothing pending: the last committed seq


async def test_writes_of_two_sources_merge(
    client: cdb.Client, players: cdb.KindHandle[Player], server: ServerProcess
) -> None:
    await players.assert_(1, ANA)
    await client.sync()
    async with cdb.connect(server.host, server.port) as other:
        other_players = await other.resolve_kind(Player)
        await other_players.patch(1, hp=10)
        await other.sync()
        result = await players.query(1)
        assert result.value is not None and result.value.hp == 10
        assert result.source_set == bit(client) | bit(other)


# --- values refused before sending ----------------------------------------------------------


async def test_a_value_that_does_not_fit_is_refused_before_sending(
    client: cdb.Client, players: cdb.KindHandle[Player], errors: Errors
) -> None:
    with pytest.raises(cdb.InvalidData, match="hp"):
        await players.assert_(1, Player(name="ana", hp=70_000))
    with pytest.raises(cdb.InvalidData, match="name"):
        await players.assert_(1, Player(name="x" * 33))
    with pytest.raises(cdb.InvalidData):
        await players.assert_(1, Player(inventory=list(range(65))))
    with pytest.raises(cdb.InvalidData, match="hp"):
        await players.patch(1, hp=-1)
    with pytest.raises(cdb.InvalidData, match="metadata"):
        await players.assert_(1, ANA, meta=bytes(70_000))
    with pytest.raises(ValueError, match="at most 32 bytes"):
        await players.assert_(bytes(33), ANA)
    # nothing reached the server: no entity, no rejection
    await client.sync()
    assert not (await players.query(1)).found
    assert errors.received == []


# --- rejected writes ------------------------------------------------------------------------


async def test_a_rejected_write_reaches_on_error_and_the_next_call(
    client: cdb.Client, players: cdb.KindHandle[Player], errors: Errors
) -> None:
    bad_row = Assert(players.kind_id, cdb.id_from_int(1), b"\x01").encode()
    await client.connection.send_payload(Opcode.ASSERT, bad_row)
    rejected = await errors.wait()
    assert isinstance(rejected, cdb.WriteRejected)
    assert rejected.code == ErrorCode.INVALID_DATA
    assert rejected.op == Opcode.ASSERT
    assert isinstance(rejected.reason, cdb.InvalidDataError)
    with pytest.raises(cdb.WriteRejected) as caught:
        await client.sync()
    assert caught.value is rejected
    assert caught.value.more == ()
    # raised once: the connection and the other writes go on
    await players.assert_(2, ANA)
    await client.sync()
    assert (await players.query(2)).value == ANA
    assert not (await players.query(1)).found


async def test_every_call_raises_a_pending_rejection(
    client: cdb.Client, players: cdb.KindHandle[Player], errors: Errors
) -> None:
    bad_row = Assert(players.kind_id, cdb.id_from_int(1), b"\x01").encode()
    for _ in range(3):
        await client.connection.send_payload(Opcode.ASSERT, bad_row)
    await errors.wait(3)
    with pytest.raises(cdb.WriteRejected) as caught:
        await players.assert_(2, ANA)  # a write raises it too, and is not sent
    assert len(caught.value.more) == 2
    assert "2 more" in str(caught.value)
    await client.sync()
    assert not (await players.query(2)).found


async def test_writes_from_a_read_only_client_are_rejected(
    client: cdb.Client, players: cdb.KindHandle[Player], server: ServerProcess
) -> None:
    reader_errors = Errors()
    async with cdb.connect(
        server.host, server.port, read_only=True, on_error=reader_errors
    ) as reader:
        handle = await reader.resolve_kind(Player)
        await handle.assert_(1, ANA)
        rejected = await reader_errors.wait()
        assert isinstance(rejected, cdb.WriteRejected)
        assert isinstance(rejected.reason, cdb.ReadOnlyError)
        with pytest.raises(cdb.WriteRejected):
            await handle.query(1)
        assert not (await handle.query(1)).found


async def test_sync_raises_the_rejection_of_an_earlier_write(
    client: cdb.Client, players: cdb.KindHandle[Player]
) -> None:
    bad_row = Assert(players.kind_id, cdb.id_from_int(1), b"\x01").encode()
    await players.assert_(2, ANA)
    await client.connection.send_payload(Opcode.ASSERT, bad_row)
    with pytest.raises(cdb.WriteRejected) as caught:
        await client.sync()  # the barrier is passed, then the rejection is raised
    assert isinstance(caught.value.reason, cdb.InvalidDataError)
    assert (await players.query(2)).value == ANA
    await client.sync()  # raised once
