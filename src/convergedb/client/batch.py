"""Client-side batches: many writes, of any kinds, sent as few BATCH frames.

    async with client.batch() as b:
        for player in players:
            b.assert_(players_handle, player.id, player)
        b.retract(matches_handle, old_match_id)
    # sent here, when the block ends

The writes are encoded as they are added (a value that does not fit raises `InvalidData` at
once) into a growing buffer, and cut into BATCH frames that each stay under the server's maximum
payload. Nothing is sent before `flush()` or the end of the `async with` block. Each BATCH frame
lands in one server flush; a batch bigger than one frame may be spread over several flushes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ..protocol.codes import Opcode
from ..protocol.wire import BytesLike
from .errors import PayloadTooLarge
from .handle import EntityKey, KindHandle, merge_changes

if TYPE_CHECKING:
    from .client import Client

T = TypeVar("T")

_COUNT: Final = struct.Struct("<I")
_OP_HEAD: Final = struct.Struct("<BI")
"""A sub-operation's header: op u8, body_len u32."""
_COUNT_SIZE: Final = _COUNT.size
_OP_HEAD_SIZE: Final = _OP_HEAD.size


class _Frame:
    """The payload of one BATCH frame being built: a count placeholder, then the sub-operations."""

    __slots__ = ("buffer", "count")

    def __init__(self) -> None:
        self.buffer = bytearray(_COUNT_SIZE)
        self.count = 0

    def add(self, op: Opcode, body: bytes) -> None:
        self.buffer += _OP_HEAD.pack(op, len(body))
        self.buffer += body
        self.count += 1

    def seal(self) -> bytearray:
        """The finished payload, with its count written in."""
        _COUNT.pack_into(self.buffer, 0, self.count)
        return self.buffer


class Batch:
    """Writes of any kinds, collected to be sent together as BATCH frames.

    Make one with `Client.batch`. Add writes with `assert_`, `patch` and `retract` (not
    awaited: they only encode, so a value that does not fit raises `convergedb.InvalidData` at
    once), then send them with `await flush()` or by leaving an `async with` block. **If the
    block raises, the batch is discarded: none of its writes that were not flushed yet are
    sent.** Writes already flushed stay sent.

    The writes are cut into BATCH frames that each stay under the server's maximum payload.
    Each frame lands in one server flush; a batch bigger than one frame may be spread over
    several flushes. The server applies the writes in the order they were added, each on its
    own: one that it rejects is dropped alone and reported as a `WriteRejected`.

    Example:
        ```python
        async with client.batch() as b:
            for pid, player in snapshot.items():
                b.assert_(players, pid, player)
            b.patch(players, "player:ana", hp=75)
            b.retract(matches, old_match_id)
        await client.sync()  # every write of the batch is durable and visible
        ```
    """

    def __init__(self, client: Client) -> None:
        """Make an empty batch for `client` (`Client.batch` does it).

        Args:
            client: The client whose connection sends the batch.
        """
        self._client = client
        self._sealed: list[bytearray] = []
        self._frame = _Frame()
        self._count = 0

    def __len__(self) -> int:
        """The number of writes added and not yet flushed."""
        return self._count

    def __repr__(self) -> str:
        return f"Batch({self._count} writes, {self.size} bytes)"

    @property
    def size(self) -> int:
        """The payload bytes of the writes added and not yet flushed (frame headers excluded)."""
        return sum(len(frame) for frame in self._sealed) + len(self._frame.buffer)

    # --- adding writes ------------------------------------------------------------------------

    def assert_(
        self, handle: KindHandle[T], entity_id: EntityKey, value: T, *, meta: BytesLike = b""
    ) -> None:
        """Add an ASSERT of `value` (see `KindHandle.assert_`). Nothing is sent yet.

        Args:
            handle: The kind's handle (any kind of the same client).
            entity_id: The entity: an `EntityKey`.
            value: The entity's whole value, an instance of the handle's class.
            meta: The write's metadata.

        Raises:
            InvalidData: `value` does not fit the schema.
            TypeError: `entity_id` names no entity, or `meta` is not bytes.
            ValueError: `entity_id` is out of range.
            PayloadTooLarge: This one write would not fit in a BATCH frame under the server's
                maximum payload.
            ReadOnlyHandle: The handle cannot write (an older declaration's handle).
            ReadOnlyError: A `DynamicKindHandle` of a read-only client.
        """
        self._add(Opcode.ASSERT, handle.assert_payload(entity_id, value, meta))

    def patch(
        self,
        handle: KindHandle[Any],
        entity_id: EntityKey,
        changes: Mapping[str, Any] | None = None,
        /,
        *,
        meta: BytesLike = b"",
        **fields: Any,
    ) -> None:
        """Add a PATCH of the named fields (see `KindHandle.patch`). Nothing is sent yet.

        Args:
            handle: The kind's handle (any kind of the same client).
            entity_id: The entity: an `EntityKey`.
            changes: Field names to new values (optional; a field named `meta` must go here).
            meta: The write's metadata.
            fields: More field names to new values, as keyword arguments.

        Raises:
            AttributeError: A name is not a field of the handle's class.
            InvalidData: No field is given, or a value does not fit its field.
            TypeError: A field is given twice, `entity_id` names no entity, or `meta` is not
                bytes.
            ValueError: `entity_id` is out of range.
            PayloadTooLarge: This one write would not fit in a BATCH frame under the server's
                maximum payload.
            ReadOnlyHandle: The handle cannot write (an older declaration's handle).
            ReadOnlyError: A `DynamicKindHandle` of a read-only client.
        """
        payload = handle.patch_payload(entity_id, merge_changes(changes, fields), meta)
        self._add(Opcode.PATCH, payload)

    def retract(
        self, handle: KindHandle[Any], entity_id: EntityKey, *, meta: BytesLike = b""
    ) -> None:
        """Add a RETRACT (see `KindHandle.retract`). Nothing is sent yet.

        Args:
            handle: The kind's handle (any kind of the same client).
            entity_id: The entity: an `EntityKey`.
            meta: The write's metadata.

        Raises:
            TypeError: `entity_id` names no entity, or `meta` is not bytes.
            ValueError: `entity_id` is out of range.
            PayloadTooLarge: This one write would not fit in a BATCH frame under the server's
                maximum payload.
            ReadOnlyHandle: The handle cannot write (an older declaration's handle).
            ReadOnlyError: A `DynamicKindHandle` of a read-only client.
        """
        self._add(Opcode.RETRACT, handle.retract_payload(entity_id, meta))

    def _add(self, op: Opcode, body: bytes) -> None:
        max_payload = self._client.max_payload
        needed = _OP_HEAD_SIZE + len(body)
        if _COUNT_SIZE + needed > max_payload:
            raise PayloadTooLarge(
                _COUNT_SIZE + needed, max_payload, f"a BATCH holding this one {op.name}"
            )
        if len(self._frame.buffer) + needed > max_payload:
            self._sealed.append(self._frame.seal())
            self._frame = _Frame()
        self._frame.add(op, body)
        self._count += 1

    # --- sending ------------------------------------------------------------------------------

    async def flush(self) -> None:
        """Send the writes added so far, as BATCH frames, and empty the batch.

        Returns once the frames are handed to the connection; use `Client.sync` to wait until
        the server has flushed them. Leaving an `async with` block without an exception calls
        it.

        Raises:
            WriteRejected: A write sent earlier was rejected (see `Client`); the batch is then
                kept, unsent, and can be flushed again.
            ConnectionLost: The client is not connected (the batch is kept), or the connection
                was lost while sending (the frames not sent are lost).
        """
        self._client.raise_pending_errors()
        if self._frame.count:
            self._sealed.append(self._frame.seal())
        frames, self._sealed = self._sealed, []
        self._frame = _Frame()
        self._count = 0
        for payload in frames:
            await self._client._send_write(Opcode.BATCH, payload, check=False)

    def discard(self) -> None:
        """Drop every write added and not yet flushed (what an exception in the block does)."""
        self._sealed = []
        self._frame = _Frame()
        self._count = 0

    async def __aenter__(self) -> Batch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.flush()
        else:
            self.discard()
