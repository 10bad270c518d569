"""The catalog of kinds: ids, schema versions, row codecs, and each kind's in-memory table."""

from __future__ import annotations

from ..limits import MAX_KINDS, RESERVED_KIND_PREFIX
from ..protocol.codes import ErrorCode
from ..protocol.errors import ProtocolError
from ..schema.definition import check_user_kind_name
from ..schema.evolution import compare_kinds, merge_names
from ..schema.rows import RowCodec
from ..schema.types import KindDef
from .storage import StoredKind
from .table import Entity


class KindState:
    """A registered kind: its current definition and codec, and its entities when in memory."""

    __slots__ = (
        "alive",
        "codec",
        "definition",
        "entities",
        "event_seq",
        "event_stream",
        "field_counts",
        "kind_id",
        "schema_version",
        "system",
        "tombstones",
        "watchers",
    )

    def __init__(
        self,
        kind_id: int,
        definition: KindDef,
        field_counts: tuple[int, ...],
        event_seq: int = 0,
    ) -> None:
        self.kind_id = kind_id
        self.event_stream = definition.event_stream
        self.event_seq = event_seq
        """The sequence number of the kind's last recorded event (event-stream kinds)."""
        self.definition = definition
        self.field_counts = field_counts
        self.schema_version = len(field_counts)
        self.codec = RowCodec(definition.fields)
        self.system = definition.name.startswith(RESERVED_KIND_PREFIX)
        self.entities: dict[bytes, Entity] | None = None if definition.disk_backed else {}
        self.watchers = 0
        self.alive = 0
        """Committed alive entities (kept up to date by the engine)."""
        self.tombstones = 0
        """Live subscriptions to this kind; the engine describes changes only when watched."""
        """The committed entities (tombstones included), or None for a disk-backed kind."""

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def disk_backed(self) -> bool:
        return self.definition.disk_backed

    def stored(self) -> StoredKind:
        return StoredKind(self.kind_id, self.definition, self.field_counts, self.event_seq)

    def current_row(self, entity: Entity) -> bytes:
        """The entity's row as the current schema version (older rows are widened)."""
        if entity.schema_version == self.schema_version:
            return entity.row
        return self.codec.widen(entity.row, self.field_counts[entity.schema_version - 1])

    def evolve(self, definition: KindDef) -> bool:
        """Apply a registration of the same kind; True when the stored kind changed.

        Identical fields keep the schema version (names are taken from the new definition);
        appended fields add one version. Anything else raises SCHEMA_CONFLICT.
        """
        evolution = compare_kinds(self.definition, definition)
        merged = merge_names(self.definition, definition)
        changed = merged != self.definition
        if evolution.is_appended:
            self.field_counts = (*self.field_counts, len(merged.fields))
            self.schema_version = len(self.field_counts)
            self.codec = RowCodec(merged.fields)
            changed = True
        self.definition = merged
        return changed


class Catalog:
    """Every kind, by id and by name."""

    def __init__(self) -> None:
        self.by_id: dict[int, KindState] = {}
        self.by_name: dict[str, KindState] = {}
        self._next_id = 1

    def load(self, stored: StoredKind) -> KindState:
        kind = KindState(stored.kind_id, stored.definition, stored.field_counts, stored.event_seq)
        self._add(kind)
        return kind

    def _add(self, kind: KindState) -> None:
        self.by_id[kind.kind_id] = kind
        self.by_name[kind.name] = kind
        self._next_id = max(self._next_id, kind.kind_id + 1)

    def register(self, definition: KindDef, *, system: bool = False) -> tuple[KindState, bool]:
        """Create or evolve a kind; returns it and whether the stored kind changed.

        User registrations of `convergedb_` names are RESERVED_NAME; schema conflicts are
        SCHEMA_CONFLICT (raised as the schema errors, mapped to codes by the caller).
        """
        if not system:
            check_user_kind_name(definition.name)
        existing = self.by_name.get(definition.name)
        if existing is not None:
            return existing, existing.evolve(definition)
        if self._next_id > MAX_KINDS:
            raise ProtocolError(
                ErrorCode.LIMIT_EXCEEDED, f"the server holds {MAX_KINDS} kinds, the most it can"
            )
        kind = KindState(self._next_id, definition, (len(definition.fields),))
        self._add(kind)
        return kind, True

    def get(self, kind_id: int, op: int) -> KindState:
        """The kind with this id, or UNKNOWN_KIND."""
        kind = self.by_id.get(kind_id)
        if kind is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_KIND,
                f"no kind with id {kind_id}; register it (CREATE_KIND) or resolve it by name",
                op,
            )
        return kind
