"""The system kind `convergedb_connections`: one entity per writer source (SPEC §3, Presence).

The server asserts each writer's presence entity with the writer's own source bit, so it goes
away through the normal liveness path when the source dies.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from ..ids import id_from_int
from ..schema.rows import RowCodec
from ..schema.types import Field, FieldType, KindDef
from .catalog import Catalog, KindState
from .engine import Engine

if TYPE_CHECKING:
    from .connection import ServerConnection

PRESENCE_KIND: Final = KindDef(
    "convergedb_connections",
    (
        Field(0, "name", FieldType.STRING, max_length=256),
        Field(1, "source_id", FieldType.U8),
        Field(2, "connected_at_ms", FieldType.U64),
        Field(3, "last_seen_at_ms", FieldType.U64),
    ),
)
"""The schema of `convergedb_connections`; entity id = the source id as a u64 (id_from_int)."""
_NAME_LIMIT: Final = 256


class Presence:
    """Maintains `convergedb_connections` for writer connections."""

    def __init__(self, catalog: Catalog, engine: Engine) -> None:
        self.engine = engine
        kind, changed = catalog.register(PRESENCE_KIND, system=True)
        if changed:
            engine.kind_changed(kind, None)
        self.kind: KindState = kind
        self._codec = RowCodec(PRESENCE_KIND.fields)

    def connected(self, connection: ServerConnection) -> None:
        """A writer connection now holds its source (a new claim, a reclaim or a takeover)."""
        self._assert(connection, _now_ms())

    def seen(self, connection: ServerConnection) -> None:
        """A sign of life: refresh `last_seen_at_ms`, at most once per heartbeat interval."""
        now = _now_ms()
        if now - connection.presence_written_ms >= connection.heartbeat_interval_ms:
            self._assert(connection, now)

    def _assert(self, connection: ServerConnection, now_ms: int) -> None:
        source_id = connection.source_id
        if source_id is None:
            return
        name = connection.name.encode()[:_NAME_LIMIT].decode(errors="ignore")
        row = self._codec.encode([name, source_id, connection.connected_at_ms, now_ms])
        self.engine.write_assert(self.kind, id_from_int(source_id), row, 1 << source_id, b"")
        connection.presence_written_ms = now_ms


def _now_ms() -> int:
    return int(time.time() * 1000)
