"""Entity-id helpers."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convergedb.ids import (
    entity_id,
    id_from_bytes,
    id_from_int,
    id_from_str,
    id_from_uuid,
    id_to_int,
)


@given(st.integers(0, 2**64 - 1))
def test_int_ids_are_u64_little_endian_zero_padded(n: int) -> None:
    eid = id_from_int(n)
    assert eid == n.to_bytes(8, "little") + bytes(24)
    assert id_to_int(eid) == n
    assert entity_id(n) == eid


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_int_ids_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="u64"):
        id_from_int(bad)


def test_uuid_string_and_bytes_ids() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert id_from_uuid(u) == u.bytes + bytes(16)
    assert entity_id(u) == id_from_uuid(u)
    assert id_from_str("player:1") == hashlib.sha256(b"player:1").digest()
    assert entity_id("player:1") == id_from_str("player:1")
    assert id_from_bytes(b"abc") == b"abc" + bytes(29)
    assert entity_id(b"x" * 32) == b"x" * 32


def test_bad_ids_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="hash longer keys with id_from_str"):
        id_from_bytes(bytes(33))
    with pytest.raises(TypeError, match="cannot make an entity id from float"):
        entity_id(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        id_from_int(True)
