"""The committed state of one entity, as kept in memory and in the store."""

from __future__ import annotations

from typing import NamedTuple


class Entity(NamedTuple):
    """The committed state of an entity (alive while `sources` is not 0, else a tombstone).

    A tuple on purpose: tuples of atomic values are untracked by the cyclic garbage collector,
    so a million entities add nothing to its pauses. Entities committed by one flush share the
    same `seq` object.
    """

    row: bytes
    """The field data (empty for a tombstone), written under `schema_version`."""
    version: int
    sources: int
    """The source-set bitmask; 0 for a tombstone."""
    seq: int
    """The seq of the flush that last changed the entity (notified changes only)."""
    schema_version: int
    cause: int
    """For a tombstone: why it died (DeleteCause)."""
    deleted_at_ms: int
    """For a tombstone: when it died (Unix ms), for the retention."""

    @property
    def alive(self) -> bool:
        return self.sources != 0
