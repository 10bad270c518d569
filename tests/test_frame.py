"""Frame header encoding, CRC, and the incremental FrameReader (docs/protocol.md, "Frame")."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convergedb.limits import DEFAULT_MAX_PAYLOAD, HEADER_SIZE
from convergedb.protocol import ErrorCode, Frame, FrameReader, Opcode, ProtocolError
from convergedb.protocol.frame import crc16_xmodem, encode_frame, encode_header


def bitwise_crc16_xmodem(data: bytes) -> int:
    """CRC-16/XMODEM from its definition: poly 0x1021, init 0, no reflection, no final xor."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def raw_header(
    version: int = 1,
    flags: int = 0,
    stream_id: int = 0,
    opcode: int = Opcode.HEARTBEAT,
    payload_len: int = 0,
    crc: int | None = None,
) -> bytes:
    """A header with every field under the test's control (a correct CRC unless one is given)."""
    body = struct.pack("<BBHHI", version, flags, stream_id, opcode, payload_len)
    return body + struct.pack("<H", bitwise_crc16_xmodem(body) if crc is None else crc)


def as_tuples(frames: list[Frame]) -> list[tuple[int, int, int, bytes]]:
    return [(f.flags, f.stream_id, f.opcode, bytes(f.payload)) for f in frames]


def feed_chunks(reader: FrameReader, data: bytes, sizes: list[int]) -> list[Frame]:
    """Feed `data` cut at the given chunk sizes (the rest in one last chunk)."""
    frames: list[Frame] = []
    pos = 0
    for size in sizes:
        if pos >= len(data):
            break
        frames += reader.feed(data[pos : pos + size])
        pos += size
    if pos < len(data):
        frames += reader.feed(data[pos:])
    return frames


def expect_error(code: ErrorCode, reader: FrameReader, *chunks: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        for chunk in chunks:
            reader.feed(chunk)
    assert info.value.code is code
    return info.value


# --- vectors ----------------------------------------------------------------------------------


def test_crc_vector() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3


@given(st.binary(max_size=64))
def test_crc_matches_its_definition(data: bytes) -> None:
    assert crc16_xmodem(data) == bitwise_crc16_xmodem(data)


def test_query_header_vector() -> None:
    expected = bytes.fromhex("01 00 07 00 04 00 22 00 00 00 da 74")
    assert encode_header(Opcode.QUERY, 7, 34) == expected


def test_heartbeat_header_vector() -> None:
    expected = bytes.fromhex("01 00 00 00 07 00 00 00 00 00 04 a7")
    assert encode_header(Opcode.HEARTBEAT, 0, 0) == expected
    assert encode_frame(Opcode.HEARTBEAT, 0, b"") == expected


def test_encode_frame_is_header_then_payload() -> None:
    payload = bytes(range(34))
    frame = encode_frame(Opcode.QUERY, 7, payload, flags=1)
    assert frame[:HEADER_SIZE] == encode_header(Opcode.QUERY, 7, 34, flags=1)
    assert frame[HEADER_SIZE:] == payload
    assert frame[1] == 1


# --- the reader -------------------------------------------------------------------------------

frame_specs = st.lists(
    st.tuples(
        st.integers(0, 0xFF),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.binary(max_size=300),
    ),
    max_size=12,
)


def stream_of(specs: list[tuple[int, int, int, bytes]]) -> bytes:
    return b"".join(
        encode_frame(op, stream, payload, flags) for flags, stream, op, payload in specs
    )


@given(frame_specs)
def test_all_at_once(specs: list[tuple[int, int, int, bytes]]) -> None:
    reader = FrameReader()
    assert as_tuples(reader.feed(stream_of(specs))) == specs
    assert reader.buffered == 0


@given(frame_specs)
def test_byte_by_byte(specs: list[tuple[int, int, int, bytes]]) -> None:
    data = stream_of(specs)
    reader = FrameReader()
    frames = feed_chunks(reader, data, [1] * len(data))
    assert as_tuples(frames) == specs
    assert reader.buffered == 0


@given(frame_specs, st.lists(st.integers(0, 400), max_size=80))
def test_random_chunks(specs: list[tuple[int, int, int, bytes]], sizes: list[int]) -> None:
    reader = FrameReader()
    assert as_tuples(feed_chunks(reader, stream_of(specs), sizes)) == specs
    assert reader.buffered == 0


def test_buffered_counts_waiting_bytes() -> None:
    data = encode_frame(Opcode.OK, 1, bytes(8))
    reader = FrameReader()
    assert reader.feed(data[:5]) == []
    assert reader.buffered == 5
    assert reader.feed(data[5:15]) == []
    assert reader.buffered == 15
    assert len(reader.feed(data[15:])) == 1
    assert reader.buffered == 0


def test_payload_inside_one_chunk_is_a_view_of_it() -> None:
    data = encode_frame(Opcode.OK, 1, bytes(8)) + encode_frame(Opcode.OK, 2, b"x" * 8)
    frames = FrameReader().feed(data)
    for frame in frames:
        assert isinstance(frame.payload, memoryview)
        assert frame.payload.obj is data
        assert frame.payload.readonly


def test_mutable_chunk_is_copied() -> None:
    chunk = bytearray(encode_frame(Opcode.OK, 1, b"12345678"))
    (frame,) = FrameReader().feed(chunk)  # type: ignore[arg-type]
    chunk[HEADER_SIZE:] = b"\x00" * 8
    assert bytes(frame.payload) == b"12345678"


def test_empty_payload_after_split_header() -> None:
    data = encode_frame(Opcode.HEARTBEAT, 3, b"") + encode_frame(Opcode.SYNC, 4, b"")
    reader = FrameReader()
    frames = reader.feed(data[:7]) + reader.feed(data[7:20]) + reader.feed(data[20:])
    assert as_tuples(frames) == [(0, 3, Opcode.HEARTBEAT, b""), (0, 4, Opcode.SYNC, b"")]


def test_unknown_opcode_is_not_the_readers_business() -> None:
    (frame,) = FrameReader().feed(encode_frame(0x7777, 0, b"abc"))
    assert frame.opcode == 0x7777


def test_large_frame_in_small_chunks() -> None:
    """16 MiB in 1 KiB chunks: linear work (a reader that re-joined its buffer per chunk would
    copy ~128 GiB here and never finish)."""
    payload = bytes(range(256)) * (DEFAULT_MAX_PAYLOAD // 256)
    data = encode_frame(Opcode.BATCH, 0, payload) + encode_frame(Opcode.SYNC, 5, b"")
    reader = FrameReader()
    frames: list[Frame] = []
    for pos in range(0, len(data), 1024):
        frames += reader.feed(data[pos : pos + 1024])
    assert [f.opcode for f in frames] == [Opcode.BATCH, Opcode.SYNC]
    assert frames[0].payload == payload
    assert reader.buffered == 0


def test_payload_at_the_maximum_is_accepted() -> None:
    (frame,) = FrameReader(max_payload=10).feed(encode_frame(Opcode.OK, 1, bytes(10)))
    assert len(frame.payload) == 10


def test_max_payload_must_fit_a_u32() -> None:
    with pytest.raises(ValueError):
        FrameReader(max_payload=-1)
    with pytest.raises(ValueError):
        FrameReader(max_payload=2**32)


# --- header checks ----------------------------------------------------------------------------


@pytest.mark.parametrize("split", [False, True])
def test_bad_crc(split: bool) -> None:
    header = raw_header(crc=0x1234)
    chunks = [header[:5], header[5:]] if split else [header]
    error = expect_error(ErrorCode.BAD_FRAME, FrameReader(), *chunks)
    assert error.closes


def test_every_flipped_header_bit_is_caught() -> None:
    header = raw_header(stream_id=7, opcode=Opcode.QUERY, payload_len=34)
    for bit in range(HEADER_SIZE * 8):
        broken = bytearray(header)
        broken[bit // 8] ^= 1 << (bit % 8)
        expect_error(ErrorCode.BAD_FRAME, FrameReader(), bytes(broken))


def test_wrong_version() -> None:
    expect_error(ErrorCode.UNSUPPORTED_VERSION, FrameReader(), raw_header(version=2))


def test_oversize_is_rejected_before_the_payload() -> None:
    reader = FrameReader(max_payload=100)
    header = raw_header(opcode=Opcode.ASSERT, payload_len=101)
    error = expect_error(ErrorCode.PAYLOAD_TOO_LARGE, reader, header)
    assert error.op == Opcode.ASSERT


def test_oversize_default_maximum() -> None:
    header = raw_header(payload_len=DEFAULT_MAX_PAYLOAD + 1)
    expect_error(ErrorCode.PAYLOAD_TOO_LARGE, FrameReader(), header[:3], header[3:])


def test_check_order_crc_first() -> None:
    header = raw_header(version=9, payload_len=2**32 - 1, crc=0)
    expect_error(ErrorCode.BAD_FRAME, FrameReader(max_payload=10), header)


def test_check_order_version_before_size() -> None:
    header = raw_header(version=9, payload_len=2**32 - 1)
    expect_error(ErrorCode.UNSUPPORTED_VERSION, FrameReader(max_payload=10), header)


def test_bad_frame_after_good_ones_in_one_chunk() -> None:
    good = encode_frame(Opcode.OK, 1, bytes(8))
    expect_error(ErrorCode.BAD_FRAME, FrameReader(), good + raw_header(crc=1))


def test_reader_is_unusable_after_an_error() -> None:
    reader = FrameReader()
    first = expect_error(ErrorCode.BAD_FRAME, reader, raw_header(crc=1))
    with pytest.raises(ProtocolError) as info:
        reader.feed(encode_frame(Opcode.HEARTBEAT, 0))
    assert info.value is first
