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
- `log`:      position u64 (big-endian) -> the entity records of one flush of in-memory kinds

Keys start with the big-endian kind id so that one kind's entities are contiguous.

Why a log: a flush of in-memory kinds is made durable as ONE value appended to `log` (one
B-tree insert at the end of the tree, fsync'd on commit) instead of one random B-tree update per
entity. Random updates copy a page per touched entity and, worse, py-lmdb releases the GIL
around each one, so a big flush would ping-pong the GIL with the event loop thousands of times.
The checkpointer (`checkpoint.py`, its own process) moves log records into `entities` in the
background; recovery loads `entities` and replays the records the checkpointer has not moved
yet (meta b"checkpoint" is the last log position applied). Disk-backed kinds are read from
`entities` on demand, so their flushes write there directly.
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

FORMAT_VERSION: Final = 2
"""Format 1 had no log; a format-1 store is upgraded in place (an empty log)."""
READABLE_FORMATS: Final = frozenset({1, 2})
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
_CHECKPOINT_KEY: Final = b"checkpoint"
_CHECKPOINT: Final = struct.Struct("<QQ")
_LOG_KEY: Final = struct.Struct(">Q")
LOG_HEAD: Final = struct.Struct("<H32sIQQQHBQ")
"""A log record's head: kind id, eid, value length (DELETED: the entity was removed), then the
head of the entity value of `entities` (version, sources, seq, schema version, cause, deleted
at); the row follows. So a record is the entity's key parts then its `entities` value."""
ENTITY_HEAD_SIZE: Final = _ENTITY_HEAD.size
_LOG_HEAD: Final = LOG_HEAD
_LOG_HEAD_SIZE: Final = _LOG_HEAD.size
_LOG_VALUE_AT: Final = _LOG_HEAD_SIZE - _ENTITY_HEAD_SIZE
_DELETED: Final = 0xFFFF_FFFF


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
    log: list[bytes] = field(default_factory=list)
    """The log value, in parts: for each new state of an entity of an in-memory kind, its
    record head (`LOG_HEAD`) then its row. The engine builds it while it computes the flush
    (`log_entity` does the same, one entity at a time)."""
    direct: list[tuple[int, bytes, Entity]] = field(default_factory=list)
    """New states of entities of disk-backed kinds (written to `entities`)."""
    removed: list[tuple[int, bytes, bool]] = field(default_factory=list)
    """Entities to delete (compacted tombstones): (kind id, eid, whether its kind is logged)."""
    kinds: list[StoredKind] = field(default_factory=list)
    source_deadlines: dict[int, int] = field(default_factory=dict)
    compacted_seq: int = 0
    """The highest seq of a tombstone compaction has removed, so far."""

    def log_entity(self, kind_id: int, eid: bytes, e: Entity) -> None:
        """Append the new state of an entity of an in-memory kind to the log value."""
        head = LOG_HEAD.pack(kind_id, eid, ENTITY_HEAD_SIZE + len(e[0]), *e[1:])
        self.log += (head, e[0])


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

    def __init__(self, data_dir: Path, *, fsync: bool = True, metasync: bool | None = None) -> None:
        """`fsync`: commits are durable when they return. `metasync` (default: as `fsync`):
        False syncs a commit's data but not its meta page, so a system crash may undo the last
        commit without corrupting anything (LMDB's NOMETASYNC): for the checkpointer, whose
        commits only move what the log already holds durably."""
        data_dir.mkdir(parents=True, exist_ok=True)
        self._path = data_dir / "store"
        self._fsync = fsync
        self._metasync = fsync if metasync is None else metasync and fsync
        self._open()
        self._check_format()

    def _open(self) -> None:
        try:
            self._env = lmdb.open(
                str(self._path),
                map_size=MAP_SIZE,
                max_dbs=8,
                sync=self._fsync,
                metasync=self._metasync,
                readahead=False,
                max_readers=256,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open the store in {self._path.parent}: {exc}") from exc
        self._meta = self._env.open_db(b"meta")
        self._kinds = self._env.open_db(b"kinds")
        self._entities = self._env.open_db(b"entities")
        self._sources = self._env.open_db(b"sources")
        self._log = self._env.open_db(b"log")
        self._log_position = self._last_log_position()

    def reopen(self) -> None:
        """Close and open the environment again: after the start-up load this unmaps the pages
        the load read, which would otherwise stay in the server's resident memory."""
        self._env.close()
        self._open()

    def _check_format(self) -> None:
        with self._env.begin(write=True) as txn:
            stored = txn.get(_FORMAT_KEY, db=self._meta)
            found = None if stored is None else _U32.unpack(stored)[0]
            if found is not None and found not in READABLE_FORMATS:
                raise StoreError(
                    f"the data directory holds store format {found}; this server reads formats"
                    f" {', '.join(map(str, sorted(READABLE_FORMATS)))}: use the server version"
                    " that wrote it"
                )
            if found != FORMAT_VERSION:
                txn.put(_FORMAT_KEY, _U32.pack(FORMAT_VERSION), db=self._meta)

    def _last_log_position(self) -> int:
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._log)
            if cursor.last():
                return int(_LOG_KEY.unpack(cursor.key())[0])
            return _checkpoint_of(txn.get(_CHECKPOINT_KEY, db=self._meta))[0]

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

    def replay_log(self) -> Iterator[tuple[int, bytes, Entity | None]]:
        """Every log record the checkpointer has not moved into `entities` yet, oldest first:
        (kind id, eid, the entity's new state, or None when it was removed)."""
        with self._env.begin() as txn:
            applied, offset = _checkpoint_of(txn.get(_CHECKPOINT_KEY, db=self._meta))
            cursor = txn.cursor(db=self._log)
            if not cursor.set_range(_LOG_KEY.pack(applied + 1)):
                return
            for blob in cursor.iternext(keys=False, values=True):
                for kind_id, eid, value, _ in _log_records(blob, offset):
                    yield kind_id, eid, None if value is None else decode_entity(value)
                offset = 0

    def log_backlog(self) -> int:
        """How many flushes the log holds that the checkpointer has not wholly moved yet."""
        with self._env.begin() as txn:
            applied, _ = _checkpoint_of(txn.get(_CHECKPOINT_KEY, db=self._meta))
        return self._log_position - applied

    def count_entities(self, kind_id: int) -> int:
        return sum(1 for _ in self.iter_entities(kind_id))

    # writes -----------------------------------------------------------------------------------

    def commit(self, write: FlushWrite) -> None:
        """Make one flush durable: every change in one transaction (fsync'd on commit)."""
        log = _encode_log(write) if write.log or write.removed else None
        with self._env.begin(write=True) as txn:
            if log:
                position = self._log_position + 1
                txn.put(_LOG_KEY.pack(position), log, db=self._log, append=True)
            if write.direct:
                txn.cursor(db=self._entities).putmulti(_entity_items(write.direct))
            for kind_id, eid, logged in write.removed:
                if not logged:
                    txn.delete(entity_key(kind_id, eid), db=self._entities)
            for kind in write.kinds:
                txn.put(_KIND_KEY.pack(kind.kind_id), _encode_kind(kind), db=self._kinds)
            for source_id, deadline in write.source_deadlines.items():
                txn.put(bytes((source_id,)), _U32.pack(deadline), db=self._sources)
            txn.put(_SEQ_KEY, _U64.pack(write.seq), db=self._meta)
            if write.removed:
                txn.put(_COMPACTED_KEY, _U64.pack(write.compacted_seq), db=self._meta)
        if log:
            self._log_position = position

    def checkpoint(self, max_records: int) -> int:
        """Move the oldest `max_records` log records into `entities`; returns how many it moved
        (0: the log is empty, or another checkpointer moved them first).

        The records are read and merged (only each entity's last state, in key order) in a read
        transaction, so that the write transaction, which holds LMDB's single write lock and
        thereby any flush commit meanwhile, only writes. A big flush's log value is moved in
        several transactions (the checkpoint remembers the offset reached inside it). Safe to
        run from another process while a server writes.
        """
        with self._env.begin() as txn:
            applied, offset = _checkpoint_of(txn.get(_CHECKPOINT_KEY, db=self._meta))
            offset_read = offset
            cursor = txn.cursor(db=self._log)
            if not cursor.set_range(_LOG_KEY.pack(applied + 1)):
                return 0
            latest: dict[bytes, bytes | None] = {}
            moved = 0
            done, done_offset = applied, offset
            for key, blob in cursor:
                position = _LOG_KEY.unpack(key)[0]
                reached = offset
                for kind_id, eid, value, reached in _log_records(blob, offset):  # noqa: B007
                    latest[_KIND_KEY.pack(kind_id) + eid] = value
                    moved += 1
                    if moved >= max_records:
                        break
                offset = 0
                if reached == len(blob):
                    done, done_offset = position, 0
                else:
                    done_offset = reached  # `done` stays before this value: partly moved
                    break
                if moved >= max_records:
                    break
        if not moved:
            return 0
        puts = sorted((k, v) for k, v in latest.items() if v is not None)
        removed = sorted(k for k, v in latest.items() if v is None)
        with self._env.begin(write=True) as txn:
            if _checkpoint_of(txn.get(_CHECKPOINT_KEY, db=self._meta)) != (applied, offset_read):
                return 0  # another checkpointer got there first: look again
            txn.cursor(db=self._entities).putmulti(puts)
            for key in removed:
                txn.delete(key, db=self._entities)
            cursor = txn.cursor(db=self._log)
            if done > applied and cursor.set_range(_LOG_KEY.pack(applied + 1)):
                while cursor.key() and _LOG_KEY.unpack(cursor.key())[0] <= done:
                    cursor.delete()
            txn.put(_CHECKPOINT_KEY, _CHECKPOINT.pack(done, done_offset), db=self._meta)
        return moved

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


def _encode_log(write: FlushWrite) -> bytes:
    """The log value of a flush: a record per entity of an in-memory kind, then the removals."""
    parts = write.log
    for kind_id, eid, logged in write.removed:
        if logged:
            parts.append(_LOG_HEAD.pack(kind_id, eid, _DELETED, 0, 0, 0, 0, 0, 0))
    return b"".join(parts)


def _log_records(blob: bytes, at: int = 0) -> Iterator[tuple[int, bytes, bytes | None, int]]:
    """(kind id, eid, the entity value or None when removed, the offset after the record) of
    every record of a log value from offset `at`."""
    unpack = _LOG_HEAD.unpack_from
    end = len(blob)
    while at < end:
        kind_id, eid, size = unpack(blob, at)[:3]
        start = at + _LOG_VALUE_AT
        if size == _DELETED:
            at += _LOG_HEAD_SIZE
            yield kind_id, eid, None, at
        else:
            at = start + size
            yield kind_id, eid, blob[start:at], at


def _checkpoint_of(value: bytes | None) -> tuple[int, int]:
    """(the last log position wholly moved, the offset reached inside the next one)."""
    if value is None:
        return 0, 0
    return _CHECKPOINT.unpack(value)


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
