"""Coverage-guided fuzzing (atheris, i.e. libFuzzer for Python) of the two parsers that see raw
bytes from the network: the frame reader and the row validator.

    python tests/atheris_fuzz.py frames -runs=100000
    python tests/atheris_fuzz.py rows -max_total_time=60 -artifact_prefix=/tmp/

Any libFuzzer flag may follow the target's name. tests/test_fuzz.py runs both targets for a
fixed number of runs when atheris is installed. A failing input is written to
`<artifact_prefix>crash-<sha1>`; run the script with that file's path to replay it.

`frames`: the input is a maximum payload, chunk sizes and a byte stream. `FrameReader.feed`
raises nothing but `ProtocolError` (BAD_FRAME, UNSUPPORTED_VERSION, PAYLOAD_TOO_LARGE); fed
whole or in chunks, it gives exactly the frames an independent reference parser finds (each
one re-encodes to the bytes it came from), those before a bad header included (returned by
`feed`, or by `frames_before_failure` when the bad header came in the same chunk), and fails
with the same error; after an error every `feed` raises that error again.

`rows`: the input picks a schema (every field type appears in one of them) and gives a row,
raw or built to have a consistent directory, or a valid row with some bytes changed.
`is_valid` (the fast check; both of its implementations, the generated and the table-driven
one) agrees with the detailed checks of `validate` (which raise only `InvalidData`), and a
valid row decodes to values that encode to the same bytes (the canonical encoding) and splits
into segments that join back to it.

One known exception, checked for what it is: an f32 signaling NaN (exponent all ones, quiet bit
clear, payload not zero) decodes to a Python float that encodes as the quiet NaN with the same
payload (CPython's float conversions set the quiet bit), so the round trip changes that value's
bytes; what is checked then is that only NaNs changed and the new row is canonical. The server
never decodes rows (it compares bytes), so stored data is unaffected; only a client that
decodes such a row and writes the value back changes it.
"""

from __future__ import annotations

import binascii
import math
import struct
import sys
from collections.abc import Callable
from typing import Any

import atheris

with atheris.instrument_imports(include=["convergedb"]):
    from convergedb.limits import HEADER_SIZE
    from convergedb.protocol.errors import ProtocolError
    from convergedb.protocol.frame import FrameReader, encode_frame
    from convergedb.schema import fastcheck
    from convergedb.schema.errors import InvalidData
    from convergedb.schema.rows import RowCodec
    from convergedb.schema.types import Field, FieldType

# --- frames --------------------------------------------------------------------------------

Expected = tuple[list[tuple[int, int, int, bytes]], int | None]
"""The frames (flags, stream, opcode, payload) before the first bad header, and that header's
error code (None if every header is good; an incomplete tail is simply not a frame yet)."""


def reference_frames(data: bytes, max_payload: int) -> Expected:
    frames = []
    pos = 0
    while len(data) - pos >= HEADER_SIZE:
        version, flags, stream, opcode, length, crc = struct.unpack_from("<BBHHIH", data, pos)
        if binascii.crc_hqx(data[pos : pos + 10], 0) != crc:
            return frames, 1
        if version != 1:
            return frames, 2
        if length > max_payload:
            return frames, 4
        end = pos + HEADER_SIZE + length
        if end > len(data):
            break
        frames.append((flags, stream, opcode, data[pos + HEADER_SIZE : end]))
        pos = end
    return frames, None


def feed_chunks(
    reader: FrameReader, chunks: list[bytes]
) -> tuple[list[tuple[int, int, int, bytes]], int | None]:
    got = []
    for chunk in chunks:
        try:
            frames = reader.feed(chunk)
        except ProtocolError as exc:
            before = reader.frames_before_failure()
            got.extend((f.flags, f.stream_id, f.opcode, bytes(f.payload)) for f in before)
            return got, int(exc.code)
        got.extend((f.flags, f.stream_id, f.opcode, bytes(f.payload)) for f in frames)
    return got, None


def repaired(data: bytes, fix_version: bool) -> bytes:
    """`data` with the CRC (and the version, if asked) of every header a reader would reach
    made right, so that inputs get past the first check."""
    out = bytearray(data)
    pos = 0
    while len(out) - pos >= HEADER_SIZE:
        if fix_version:
            out[pos] = 1
        struct.pack_into("<H", out, pos + 10, binascii.crc_hqx(bytes(out[pos : pos + 10]), 0))
        pos += HEADER_SIZE + struct.unpack_from("<I", out, pos + 6)[0]
    return bytes(out)


def check_frames(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    max_payload = fdp.ConsumeIntInRange(0, 4096)
    sizes = [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 8))]
    repair = fdp.ConsumeIntInRange(0, 2)
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    if repair:
        stream = repaired(stream, fix_version=repair == 2)
    expected_frames, expected_error = reference_frames(stream, max_payload)
    chunks = []
    pos = 0
    for size in sizes:
        chunks.append(stream[pos : pos + size])
        pos += size
    chunks.append(stream[pos:])
    for pieces in ([stream], chunks):
        reader = FrameReader(max_payload)
        got, error = feed_chunks(reader, pieces)
        assert error == expected_error, (error, expected_error)
        assert got == expected_frames, (got, expected_frames)
        if error is not None:
            try:
                reader.feed(b"\x01")
            except ProtocolError as again:
                assert int(again.code) == error
            else:
                raise AssertionError("a failed reader accepted more bytes")
    pos = 0
    for flags, stream_id, opcode, payload in expected_frames:  # each re-encodes to its bytes
        encoded = encode_frame(opcode, stream_id, payload, flags)
        assert stream[pos : pos + len(encoded)] == encoded
        pos += len(encoded)


# --- rows ----------------------------------------------------------------------------------


def _schemas() -> list[RowCodec]:
    scalars = [t for t in FieldType if t.is_scalar]
    everything = [Field(i, f"s{i}", t) for i, t in enumerate(scalars)]
    n = len(everything)
    everything += [
        Field(n, "text", FieldType.STRING, max_length=12),
        Field(n + 1, "blob", FieldType.BYTES, max_length=5),
        Field(n + 2, "ftext", FieldType.STRING, fixed=True, max_length=6),
        Field(n + 3, "fblob", FieldType.BYTES, fixed=True, max_length=3),
        Field(
            n + 4,
            "pair",
            FieldType.STRUCT,
            struct_name="Pair",
            subfields=(
                Field(0, "flag", FieldType.BOOL),
                Field(1, "tag", FieldType.STRING, fixed=True, max_length=4),
                Field(2, "x", FieldType.F32),
            ),
        ),
        Field(n + 5, "bools", FieldType.BOOL, array=True, max_count=4),
        Field(n + 6, "u16s", FieldType.U16, array=True, max_count=3),
        Field(n + 7, "names", FieldType.STRING, fixed=True, array=True, max_length=3, max_count=2),
        Field(
            n + 8,
            "pairs",
            FieldType.STRUCT,
            array=True,
            max_count=2,
            struct_name="P2",
            subfields=(Field(0, "a", FieldType.U8), Field(1, "b", FieldType.BOOL)),
        ),
    ]
    small = [
        Field(0, "name", FieldType.STRING, max_length=8),
        Field(1, "hp", FieldType.U16),
        Field(2, "ok", FieldType.BOOL),
    ]
    fixed_only = [Field(0, "a", FieldType.U8), Field(1, "b", FieldType.BOOL)]
    return [RowCodec(everything), RowCodec(small), RowCodec(fixed_only)]


CODECS = _schemas()
OTHER_CHECKS = [
    (
        fastcheck.compile_row_check(c.fields, c.offsets, c.fixed_size, c._variable_checks),
        fastcheck.row_checker(c.fields, c.offsets, c.fixed_size).is_valid,
    )
    for c in CODECS
]
"""Per codec, both implementations of the fast check, whichever one the codec runs."""


def shaped_row(codec: RowCodec, fdp: atheris.FuzzedDataProvider) -> bytes:
    """A row whose directory agrees with its length: the deeper checks run."""
    fixed = bytearray(fdp.ConsumeBytes(codec.fixed_size).ljust(codec.fixed_size, b"\0"))
    data = b""
    for f in codec.fields:
        if f.is_variable:
            value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
            struct.pack_into("<I", fixed, codec.offsets[f.ordinal], len(value))
            data += value
    return bytes(fixed) + data


def changed_zero_row(codec: RowCodec, fdp: atheris.FuzzedDataProvider) -> bytes:
    row = bytearray(codec.zero_row)
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        if row:
            row[fdp.ConsumeIntInRange(0, len(row) - 1)] = fdp.ConsumeInt(1) & 0xFF
    return bytes(row)


def detailed_ok(codec: RowCodec, row: bytes) -> bool:
    try:
        codec._explain_invalid(row)
    except InvalidData:
        return False
    return True


def check_rows(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(CODECS) - 1)
    codec = CODECS[which]
    makers: list[Callable[[RowCodec, atheris.FuzzedDataProvider], bytes]] = [
        lambda _c, f: f.ConsumeBytes(f.ConsumeIntInRange(0, 300)),
        shaped_row,
        changed_zero_row,
    ]
    row = makers[fdp.ConsumeIntInRange(0, len(makers) - 1)](codec, fdp)
    fast = codec.is_valid(row)
    assert fast is True or fast is False, fast
    assert fast == detailed_ok(codec, row), (fast, row.hex())
    for check in OTHER_CHECKS[which]:
        assert check(row) == fast, (check, row.hex())
    try:
        codec.validate(row)
        assert fast, row.hex()
    except InvalidData:
        assert not fast, row.hex()
    if fast:
        values = codec.decode(row)
        again = codec.encode(values)
        assert again == row or only_nans_changed(codec, values, again), (values, row.hex())
        assert codec.join(codec.split(row)) == row


def only_nans_changed(codec: RowCodec, values: list[Any], again: bytes) -> bool:
    """Whether `again` (the re-encoded row) holds the same values but for NaNs, and is itself
    canonical (one more round trip changes nothing)."""
    values_again = codec.decode(again)
    return same_but_nans(values, values_again) and codec.encode(values_again) == again


def same_but_nans(first: Any, second: Any) -> bool:
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(
            same_but_nans(a, b) for a, b in zip(first, second, strict=True)
        )
    if isinstance(first, float) and isinstance(second, float):
        both_nan = math.isnan(first) and math.isnan(second)
        return both_nan or struct.pack("<d", first) == struct.pack("<d", second)
    return bool(first == second)


TARGETS: dict[str, Callable[[bytes], None]] = {"frames": check_frames, "rows": check_rows}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
