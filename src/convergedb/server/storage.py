"""The durable store: an LMDB environment in the data directory.

One write transaction per flush makes the flush atomic and durable (LMDB fsyncs on commit
unless `fsync` is off). Layout, in named sub-databases:

- `meta`:     b"format" -> u32 format version; b"seq" -> u64 last committed flush seq;
              b"compacted_seq" -> u64 highest seq of a tombstone compaction removed
- `kinds`:    kind_id u16 (big-endian) -> event_seq u64, n u8, n field counts u8 (one per
              schema version), kind definition (PROTOCOL.md encoding)
- `entities`: kind_id u16 (big-endian) + eid (32) -> version u64, sources u64, seq u64,
              schema_version u16, cause u8, deleted_at_ms u64, row
- `sources`:  source_id u8 -> last declared liveness deadline ms u32

Keys start with the big-endian kind id so that one kind's entities are contiguous.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import lmdb

from ..schema.definition import decode_kind_definition, encode_kind_definition
from ..schema.types import KindDef
from .table import Entity

FORMAT_VERSION: Final = 1
MAP_SIZE: Final = 1 << 40
"""Address space reserved for the map (the file grows as needed; 1 TiB is a ceiling)."""

_KIND_KEY: Final = struct.Struct(">H")
_ENTITY_HEAD: Final = struct.Struct("<QQQHBQ")
_ENTITY_HEAD_SIZE: Final = _ENTITY_HEAD.size
_U64: Final = struct.Struct("<Q")
_U32: Final = struct.Struct("<I")
_KIND_HEAD: Final = struct.Struct("<QB")
_SEQ_KEY: Final = b"seq"
_COMPACTED_KEY: Final = b"compacted_seq"
_FORMAT_KEY: Final = b"format"


class StoreError(RuntimeError):
    """The data directory cannot be used (another format, corruption, no space)."""


@dataclass(frozen=True)
class StoredKind:
    """A kind as persisted: its id, current definition and the field count of every version."""

    kind_id: int
    definition: KindDef
    field_counts: tuple[int, ...]
    """Field count of schema version 1, 2, ...; the last is the current one."""
    event_seq: int = 0
    """The sequence number of the kind's last recorded event."""

    @property
    def schema_version(self) -> int:
        return len(self.field_counts)


@dataclass
class FlushWrite:
    """Everything one flush makes durable, in one transaction."""

    seq: int
    entities: list[tuple[int, bytes, Entity]] = field(default_factory=list)
    removed: list[tuple[int, bytes]] = field(default_factory=list)
    """Entities to delete (compacted tombstones)."""
    kinds: list[StoredKind] = field(default_factory=list)
    source_deadlines: dict[int, int] = field(default_factory=dict)
    compacted_seq: int = 0
    """The highest seq of a tombstone compaction has removed, so far."""


def entity_key(kind_id: int, eid: bytes) -> bytes:
    return _KIND_KEY.pack(kind_id) + eid


def decode_entity(value: bytes | memoryview) -> Entity:
    version, sources, seq, schema_version, cause, deleted_at = _ENTITY_HEAD.unpack_from(value)
    return Entity(
        bytes(value[_ENTITY_HEAD_SIZE:]), version, sources, seq, schema_version, cause, deleted_at
    )


def _encode_kind(kind: StoredKind) -> bytes:
    head = _KIND_HEAD.pack(kind.event_seq, len(kind.field_counts))
    return head + bytes(kind.field_counts) + encode_kind_definition(kind.definition)


def _decode_kind(kind_id: int, value: bytes) -> StoredKind:
    event_seq, count = _KIND_HEAD.unpack_from(value)
    start = _KIND_HEAD.size
    field_counts = tuple(value[start : start + count])
    definition, _ = decode_kind_definition(value, start + count)
    return StoredKind(kind_id, definition, field_counts, event_seq)


class Store:
    """The LMDB environment of a data directory. Writes come from one thread at a time."""

    def __init__(self, data_dir: Path, *, fsync: bool = True) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = data_dir / "store"
        self._fsync = fsync
        self._open()
        self._check_format()

    def _open(self) -> None:
        try:
            self._env = lmdb.open(
                str(self._path),
                map_size=MAP_SIZE,
                max_dbs=8,
                sync=self._fsync,
                metasync=self._fsync,
                readahead=False,
                max_readers=256,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store in {self._path.parent}: {exc}") from exc
        self._meta = self._env.open_db(b"meta")
        self._kinds = self._env.open_db(b"kinds")
        self._entities = self._env.open_db(b"entities")
        self._sources = self._env.open_db(b"sources")

    def reopen(self) -> None:
        """Close and open the environment again: after the start-up load this unmaps the pages
        the load read, which would otherwise stay in the server's resident memory."""
        self._env.close()
        self._open()

    def _check_format(self) -> None:
        with self._env.begin(write=True) as txn:
            stored = txn.get(_FORMAT_KEY, db=self._meta)
            if stored is None:
                txn.put(_FORMAT_KEY, _U32.pack(FORMAT_VERSION), db=self._meta)
            elif _U32.unpack(stored)[0] != FORMAT_VERSION:
                raise StoreError(
                    f"the data directory holds store format {_U32.unpack(stored)[0]}; "
                    f"this server reads format {FORMAT_VERSION}"
                )

    # reads ------------------------------------------------------------------------------------

    def load_seq(self) -> int:
        """The seq of the last committed flush (0 for a new store)."""
        with self._env.begin() as txn:
            value = txn.get(_SEQ_KEY, db=self._meta)
        return 0 if value is None else int(_U64.unpack(value)[0])

    def load_compacted_seq(self) -> int:
        """The highest seq of a tombstone that compaction removed (0: none yet)."""
        with self._env.begin() as txn:
            value = txn.get(_COMPACTED_KEY, db=self._meta)
        return 0 if value is None else int(_U64.unpack(value)[0])

    def load_kinds(self) -> list[StoredKind]:
        with self._env.begin() as txn:
            return [
                _decode_kind(_KIND_KEY.unpack(key)[0], value)
                for key, value in txn.cursor(db=self._kinds)
            ]

    def load_source_deadlines(self) -> dict[int, int]:
        with self._env.begin() as txn:
            return {key[0]: _U32.unpack(value)[0] for key, value in txn.cursor(db=self._sources)}

    def iter_entities(self, kind_id: int) -> Iterator[tuple[bytes, Entity]]:
        """Every stored entity of a kind (tombstones included), in id order."""
        prefix = _KIND_KEY.pack(kind_id)
        with self._env.begin(buffers=True) as txn:
            cursor = txn.cursor(db=self._entities)
            if not cursor.set_range(prefix):
                return
            for key, value in cursor:
                if bytes(key[:2]) != prefix:
                    break
                yield bytes(key[2:]), decode_entity(value)

    def scan_entities(
        self, kind_id: int, after: bytes | None, limit: int
    ) -> list[tuple[bytes, Entity]]:
        """Up to `limit` stored entities of a kind (tombstones included), in id order, starting
        after the id `after` (from the first when None).

        Each call is its own short read transaction, so a long scan made of many calls (a
        bootstrap of a disk-backed kind) never pins old pages of the map: each chunk reads the
        state committed when it is taken.
        """
        prefix = _KIND_KEY.pack(kind_id)
        # keys are all 34 bytes: the first key above prefix + after is >= prefix + after + 00
        start = prefix if after is None else prefix + after + b"\x00"
        rows: list[tuple[bytes, Entity]] = []
        with self._env.begin(buffers=True) as txn:
            cursor = txn.cursor(db=self._entities)
            if not cursor.set_range(start):
                return rows
            for key, value in cursor:
                if len(rows) >= limit or bytes(key[:2]) != prefix:
                    break
                rows.append((bytes(key[2:]), decode_entity(value)))
        return rows

    def get_entity(self, kind_id: int, eid: bytes) -> Entity | None:
        with self._env.begin(buffers=True) as txn:
            value = txn.get(entity_key(kind_id, eid), db=self._entities)
            return None if value is None else decode_entity(value)

    def count_entities(self, kind_id: int) -> int:
        return sum(1 for _ in self.iter_entities(kind_id))

    # writes -----------------------------------------------------------------------------------

    def commit(self, write: FlushWrite) -> None:
        """Make one flush durable: every change in one transaction (fsync'd on commit)."""
        with self._env.begin(write=True) as txn:
            if write.entities:
                txn.cursor(db=self._entities).putmulti(_entity_items(write.entities))
            for kind_id, eid in write.removed:
                txn.delete(entity_key(kind_id, eid), db=self._entities)
            for kind in write.kinds:
                txn.put(_KIND_KEY.pack(kind.kind_id), _encode_kind(kind), db=self._kinds)
            for source_id, deadline in write.source_deadlines.items():
                txn.put(bytes((source_id,)), _U32.pack(deadline), db=self._sources)
            txn.put(_SEQ_KEY, _U64.pack(write.seq), db=self._meta)
            if write.removed:
                txn.put(_COMPACTED_KEY, _U64.pack(write.compacted_seq), db=self._meta)

    @staticmethod
    def backup(data_dir: Path, destination: Path) -> None:
        """Copy the store of `data_dir` into `destination` (a new directory), consistently, even
        while a server runs on it: LMDB copies one read transaction's snapshot, which is the
        state after some committed flush. The copy is compacted (free pages left out)."""
        source = data_dir / "store"
        if not (source / "data.mdb").exists():
            raise StoreError(f"{data_dir} holds no ConvergeDB store")
        if destination.exists() and any(destination.iterdir()):
            raise StoreError(f"{destination} is not empty: back up into a new directory")
        target = destination / "store"
        target.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(str(source), readonly=True, max_dbs=8, map_size=MAP_SIZE)
        try:
            env.copy(str(target), compact=True)
        finally:
            env.close()

    def close(self) -> None:
        """Close the environment (a clean shutdown; LMDB needs no recovery either way)."""
        self._env.close()


def _entity_items(entities: Iterable[tuple[int, bytes, Entity]]) -> list[tuple[bytes, bytes]]:
    """(key, value) of every entity, encoded in one tight loop (a flush's bulk of work)."""
    prefixes: dict[int, bytes] = {}
    pack = _ENTITY_HEAD.pack
    items = []
    for kind_id, eid, e in entities:
        prefix = prefixes.get(kind_id)
        if prefix is None:
            prefix = prefixes[kind_id] = _KIND_KEY.pack(kind_id)
        items.append((prefix + eid, pack(e[1], e[2], e[3], e[4], e[5], e[6]) + e[0]))
    return items
