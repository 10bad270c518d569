"""`convergedb status`, `kinds` and `get`: look at a running server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import click

from .. import limits
from ..client import connect
from ..protocol.codes import QueryStatus
from ..protocol.messages import KindInfo, Query, QueryResult
from ..schema.rows import RowCodec
from .common import connection_options, parse_entity_id, run, table, to_json


@click.command()
@click.option("--host", default=limits.DEFAULT_HOST, envvar="CONVERGEDB_HOST", show_default=True)
@click.option(
    "--admin-port",
    type=int,
    default=limits.DEFAULT_ADMIN_PORT,
    envvar="CONVERGEDB_ADMIN_PORT",
    show_default=True,
    help="The server's admin HTTP port (status comes from /v1/status).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(host: str, admin_port: int, as_json: bool) -> None:
    """Sources (connected or in their liveness grace period), kinds and their entity counts."""
    url = f"http://{host}:{admin_port}/v1/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            state: dict[str, Any] = json.load(reply)
    except (OSError, urllib.error.URLError) as exc:
        raise click.ClickException(f"cannot read {url}: {exc}") from None
    if as_json:
        click.echo(to_json(state))
        return
    counts = state["connections"]
    click.echo(
        f"{state['version']}  seq {state['seq']}  "
        f"connections: {counts['writers']} writers, {counts['readers']} readers"
    )
    click.echo("\nsources")
    click.echo(
        table(
            [
                [
                    s["source_id"],
                    s["state"],
                    s.get("name", ""),
                    s.get("liveness_deadline_ms", ""),
                    s.get("idle_ms", s.get("expires_in_ms", "")),
                ]
                for s in state["sources"]
            ],
            ["source", "state", "name", "deadline ms", "idle / expires in ms"],
        )
    )
    click.echo("\nkinds")
    click.echo(
        table(
            [
                [
                    k["kind_id"],
                    k["name"],
                    k["schema_version"],
                    k["entities"],
                    k["tombstones"],
                    k["subscribers"],
                ]
                for k in state["kinds"]
            ],
            ["id", "name", "version", "entities", "tombstones", "subscribers"],
        )
    )


@click.command()
@connection_options
def kinds(host: str, port: int, token: str, as_json: bool) -> None:
    """Every kind with its schema."""
    infos = run(_list_kinds(host, port, token))
    if as_json:
        click.echo(to_json([_kind_json(info) for info in infos]))
        return
    for info in infos:
        flags = [
            f
            for f, on in (
                ("event_stream", info.kind.event_stream),
                ("disk_backed", info.kind.disk_backed),
            )
            if on
        ]
        click.echo(
            f"{info.kind.name} (id {info.kind_id}, schema version {info.schema_version}"
            f"{', ' + ', '.join(flags) if flags else ''})"
        )
        for f in info.kind.fields:
            click.echo(f"  {f.ordinal:>2}  {f.name:<24} {f.describe_type()}")


async def _list_kinds(host: str, port: int, token: str) -> list[KindInfo]:
    async with connect(host, port, read_only=True, token=token, name="convergedb-cli") as client:
        return await client.list_kinds()


def _kind_json(info: KindInfo) -> dict[str, Any]:
    return {
        "kind_id": info.kind_id,
        "name": info.kind.name,
        "schema_version": info.schema_version,
        "event_stream": info.kind.event_stream,
        "disk_backed": info.kind.disk_backed,
        "fields": [
            {"ordinal": f.ordinal, "name": f.name, "type": f.describe_type()}
            for f in info.kind.fields
        ],
    }


@click.command()
@connection_options
@click.argument("kind")
@click.argument("entity_id")
@click.option(
    "--id-type",
    type=click.Choice(["auto", "int", "str", "uuid", "hex"]),
    default="auto",
    show_default=True,
    help="How to read ENTITY_ID: auto takes digits as an int id, a UUID as a UUID, "
    "0x... as raw bytes, anything else as a string key.",
)
def get(
    host: str, port: int, token: str, as_json: bool, kind: str, entity_id: str, id_type: str
) -> None:
    """Read one entity, decoded with the server's own schema."""
    eid = parse_entity_id(entity_id, id_type)
    info, result = run(_query(host, port, token, kind, eid))
    state: dict[str, Any] = {
        "kind": kind,
        "entity_id": eid.hex(),
        "status": result.status.name,
        "version": result.version,
        "source_set": result.source_set,
        "sources": [i for i in range(64) if result.source_set >> i & 1],
    }
    if result.status is QueryStatus.ALIVE:
        state["value"] = RowCodec(info.kind.fields).decode_named(result.data)
    if as_json:
        click.echo(to_json(state))
        return
    click.echo(
        f"{kind} {eid.hex()}: {state['status']}, version {state['version']}, "
        f"sources {state['sources']}"
    )
    for name, value in state.get("value", {}).items():
        click.echo(f"  {name}: {value!r}")


async def _query(
    host: str, port: int, token: str, kind: str, eid: bytes
) -> tuple[KindInfo, QueryResult]:
    async with connect(host, port, read_only=True, token=token, name="convergedb-cli") as client:
        infos = {info.kind.name: info for info in await client.list_kinds()}
        if kind not in infos:
            known = ", ".join(sorted(infos)) or "none"
            raise click.ClickException(f"no kind named {kind!r} (kinds: {known})")
        info = infos[kind]
        reply = await client.connection.request(Query(info.kind_id, eid))
        assert isinstance(reply, QueryResult)
        return info, reply
