"""Kinds on the server: registration, evolution, resolving by name, listing (SPEC §2)."""

from __future__ import annotations

from dataclasses import replace

from convergedb import id_from_int
from convergedb.protocol import (
    Assert,
    ConnectMode,
    CreateKind,
    Error,
    ErrorCode,
    GetKind,
    KindInfo,
    KindList,
    ListKinds,
    Query,
    QueryResult,
)
from convergedb.schema.rows import RowCodec
from convergedb.schema.types import Field, FieldType, KindDef
from server_fixture import ServerProcess
from wire_client import WireClient

V1 = KindDef(
    "ship", (Field(0, "name", FieldType.STRING, max_length=8), Field(1, "hull", FieldType.U16))
)
V2 = KindDef(
    "ship",
    (*V1.fields, Field(2, "shield", FieldType.U32), Field(3, "tag", FieldType.BYTES, max_length=4)),
)


async def connected(server: ServerProcess, **connect: object) -> WireClient:
    client = await WireClient.open(server.host, server.port)
    await client.connect(**connect)  # type: ignore[arg-type]
    return client


async def create(client: WireClient, kind: KindDef) -> KindInfo:
    reply = await client.request(CreateKind(kind))
    assert isinstance(reply, KindInfo), reply
    return reply


async def test_identical_registration_returns_the_same_kind(server: ServerProcess) -> None:
    client = await connected(server)
    first = await create(client, V1)
    assert first.schema_version == 1
    again = await create(client, V1)
    assert (again.kind_id, again.schema_version) == (first.kind_id, 1)


async def test_new_names_are_kept_without_a_new_version(server: ServerProcess) -> None:
    client = await connected(server)
    await create(client, V1)
    renamed = replace(V1, fields=(replace(V1.fields[0], name="title"), V1.fields[1]))
    info = await create(client, renamed)
    assert info.schema_version == 1 and info.kind.fields[0].name == "title"


async def test_appending_fields_migrates_existing_rows(server: ServerProcess) -> None:
    client = await connected(server, mode=ConnectMode.CLAIM, source_id=1)
    first = await create(client, V1)
    old_row = RowCodec(V1.fields).encode(["x", 7])
    client.send(Assert(first.kind_id, id_from_int(1), old_row))
    await client.sync()
    info = await create(client, V2)
    assert (info.kind_id, info.schema_version) == (first.kind_id, 2)
    result = await client.request(Query(first.kind_id, id_from_int(1)))
    assert isinstance(result, QueryResult)
    assert RowCodec(V2.fields).decode(result.data) == ["x", 7, 0, b""]
    assert result.version == 1  # migration is not a change of the entity
    # a write with the old schema's row no longer fits
    client.send(Assert(first.kind_id, id_from_int(2), old_row))
    await client.expect_async_error(ErrorCode.INVALID_DATA)


async def test_appended_kind_survives_a_restart(server: ServerProcess) -> None:
    client = await connected(server, mode=ConnectMode.CLAIM, source_id=1)
    kind_id = (await create(client, V1)).kind_id
    client.send(Assert(kind_id, id_from_int(1), RowCodec(V1.fields).encode(["y", 1])))
    await client.sync()
    await create(client, V2)
    await client.close()
    await server.restart()
    client = await connected(server)
    info = await client.request(GetKind("ship", None))
    assert isinstance(info, KindInfo) and info.schema_version == 2 and info.kind == V2
    result = await client.request(Query(kind_id, id_from_int(1)))
    assert isinstance(result, QueryResult)
    assert RowCodec(V2.fields).decode(result.data) == ["y", 1, 0, b""]


async def test_get_kind_checks_the_reader_schema_is_a_prefix(server: ServerProcess) -> None:
    writer = await connected(server)
    await create(writer, V2)
    reader = await connected(server, mode=ConnectMode.READ_ONLY)
    info = await reader.request(GetKind("ship", V1))
    assert isinstance(info, KindInfo) and info.schema_version == 1 and len(info.kind.fields) == 4
    other = replace(V1, fields=(V1.fields[0], Field(1, "hull", FieldType.U8)))
    reply = await reader.request(GetKind("ship", other))
    assert isinstance(reply, Error) and reply.code == ErrorCode.SCHEMA_CONFLICT


async def test_list_kinds(server: ServerProcess) -> None:
    client = await connected(server)
    await create(client, V1)
    other = await create(client, KindDef("dock", (Field(0, "n", FieldType.U8),), disk_backed=True))
    reply = await client.request(ListKinds())
    assert isinstance(reply, KindList)
    by_name = {info.kind.name: info for info in reply.kinds}
    assert by_name["ship"].kind == V1
    assert by_name["dock"].kind_id == other.kind_id and by_name["dock"].kind.disk_backed


async def test_flags_cannot_change(server: ServerProcess) -> None:
    client = await connected(server)
    await create(client, V1)
    reply = await client.request(CreateKind(replace(V1, event_stream=True)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.SCHEMA_CONFLICT
