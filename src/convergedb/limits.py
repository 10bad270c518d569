"""The limits and defaults of the specification, in one place.

Everything else in the package imports these names instead of repeating the numbers.
"""

from typing import Final

# --- hard limits (SPEC §12) -------------------------------------------------------------------
MAX_SOURCES: Final = 64
"""Source ids are 0..63; a source set is a u64 bitmask."""
MAX_SOURCE_ID: Final = MAX_SOURCES - 1
MAX_FIELDS: Final = 64
"""Top-level fields per kind, and sub-fields per struct."""
MAX_ARRAY_COUNT: Final = 1024
MAX_VALUE_LENGTH: Final = 65_535
"""Bytes per string/bytes value, and per metadata blob."""
MAX_METADATA_LENGTH: Final = 65_535
ENTITY_ID_LENGTH: Final = 32
MAX_KINDS: Final = 65_535
MAX_NAME_LENGTH: Final = 255
"""Kind, field and struct names are 1..255 bytes of UTF-8."""
RESERVED_KIND_PREFIX: Final = "convergedb_"

# --- protocol ---------------------------------------------------------------------------------
PROTOCOL_VERSION: Final = 1
HEADER_SIZE: Final = 12
READ_ONLY_SOURCE_ID: Final = 0xFF
"""The source id a read-only connection is told in CONNECTED."""
MAX_PAYLOAD_CEILING: Final = 0xFFFF_FFFF
"""The largest payload a u32 length can describe."""

# --- defaults (SPEC §13), all configurable ------------------------------------------------------
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 3727
DEFAULT_ADMIN_PORT: Final = 9727
DEFAULT_DATA_DIR: Final = "./data"
DEFAULT_WINDOW_MS: Final = 20
DEFAULT_MAX_PAYLOAD: Final = 16 * 1024 * 1024
DEFAULT_LIVENESS_DEADLINE_MS: Final = 30_000
DEFAULT_MAX_LIVENESS_MS: Final = 300_000
DEFAULT_HEARTBEAT_INTERVAL_MS: Final = 15_000
DEFAULT_TOMBSTONE_RETENTION_S: Final = 300.0
DEFAULT_SUBSCRIBER_BUFFER: Final = 4096
DEFAULT_SUBSCRIBER_TIMEOUT_S: Final = 60.0
DEFAULT_EVENT_RING: Final = 65_536
DEFAULT_MAX_CONNECTIONS: Final = 10_000
DEFAULT_MAX_SUBSCRIPTIONS: Final = 1024
"""Live subscriptions (state and event) per connection (ours: SPEC §13 sets no number)."""
DEFAULT_READ_TIMEOUT_S: Final = 30.0
"""Seconds a connection has to send CONNECT, and may stall inside a frame (ours)."""
DEFAULT_RECONNECT_INITIAL_S: Final = 0.1
DEFAULT_RECONNECT_CAP_S: Final = 10.0
