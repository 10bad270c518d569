"""What the client commands share: connection options, entity-id parsing, output."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import click

from .. import limits
from ..ids import EntityId, id_from_bytes, id_from_int, id_from_str, id_from_uuid

FC = TypeVar("FC", bound=Callable[..., Any])
T = TypeVar("T")


def connection_options(command: FC) -> FC:
    """--host, --port, --token (each also CONVERGEDB_<NAME>) and --json."""
    for decorator in reversed(
        [
            click.option(
                "--host",
                default=limits.DEFAULT_HOST,
                envvar="CONVERGEDB_HOST",
                show_default=True,
                help="Server address.",
            ),
            click.option(
                "--port",
                type=int,
                default=limits.DEFAULT_PORT,
                envvar="CONVERGEDB_PORT",
                show_default=True,
                help="Server port.",
            ),
            click.option(
                "--token",
                default="",
                envvar="CONVERGEDB_TOKEN",
                help="Auth token (a reader token is enough).",
            ),
            click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        ]
    ):
        command = decorator(command)
    return command


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; turn connection failures into a clear CLI error."""
    try:
        return asyncio.run(coroutine)
    except OSError as exc:
        raise click.ClickException(f"cannot reach the server: {exc}") from None


def parse_entity_id(text: str, id_type: str) -> EntityId:
    """An entity id from the command line: `auto` takes digits as an int id, a UUID as a UUID,
    `0x...` as raw hex bytes, anything else as a string key (SHA-256)."""
    try:
        if id_type == "int" or (id_type == "auto" and text.isdigit()):
            return id_from_int(int(text))
        if id_type == "hex" or (id_type == "auto" and text.startswith("0x")):
            return id_from_bytes(bytes.fromhex(text.removeprefix("0x")))
        if id_type == "uuid" or (id_type == "auto" and _is_uuid(text)):
            return id_from_uuid(uuid.UUID(text))
    except ValueError as exc:
        raise click.BadParameter(f"{text!r} is not a valid {id_type} id: {exc}") from None
    return id_from_str(text)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def to_json(value: Any) -> str:
    """JSON with bytes as hex and big integers kept exact."""
    return json.dumps(value, default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A plain text table for people."""
    cells = [headers, *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


Action = Callable[[], Awaitable[None]]
