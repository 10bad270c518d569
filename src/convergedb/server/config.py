"""Server settings, with the defaults of the specification (SPEC §10, §13)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .. import limits


class Role(Enum):
    """What a token allows."""

    ADMIN = "admin"
    WRITER = "writer"
    READER = "reader"


@dataclass(frozen=True)
class TokenGrant:
    """One configured token: its role and, for writers, the source ids it may hold (None: any)."""

    role: Role
    token: str
    sources: frozenset[int] | None = None

    @classmethod
    def parse(cls, text: str) -> TokenGrant:
        """Parse `ROLE:TOKEN[:SOURCES]`, SOURCES like `1,2,5`."""
        parts = text.split(":")
        if len(parts) not in (2, 3) or not parts[1]:
            raise ValueError(f"token {text!r}: expected ROLE:TOKEN or ROLE:TOKEN:SOURCES")
        try:
            role = Role(parts[0])
        except ValueError:
            roles = ", ".join(r.value for r in Role)
            raise ValueError(
                f"token {text!r}: unknown role {parts[0]!r} (one of {roles})"
            ) from None
        sources = None
        if len(parts) == 3:
            if role is not Role.WRITER:
                raise ValueError(f"token {text!r}: only writer tokens take a list of sources")
            sources = frozenset(_parse_source_ids(parts[2], text))
        return cls(role, parts[1], sources)


def _parse_source_ids(text: str, token: str) -> list[int]:
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"token {token!r}: sources must be ids like 1,2,5") from None
    for source_id in ids:
        if not 0 <= source_id <= limits.MAX_SOURCE_ID:
            raise ValueError(f"token {token!r}: source {source_id} is not in 0..63")
    return ids


@dataclass(frozen=True)
class ServerConfig:
    """Every server setting. `convergedb serve` builds one from flags, environment and file."""

    host: str = limits.DEFAULT_HOST
    port: int = limits.DEFAULT_PORT
    data_dir: Path = Path(limits.DEFAULT_DATA_DIR)
    window_ms: int = limits.DEFAULT_WINDOW_MS
    fsync: bool = True
    max_payload: int = limits.DEFAULT_MAX_PAYLOAD
    tokens: tuple[TokenGrant, ...] = ()
    max_liveness_ms: int = limits.DEFAULT_MAX_LIVENESS_MS
    tombstone_retention_s: float = limits.DEFAULT_TOMBSTONE_RETENTION_S
    subscriber_buffer: int = limits.DEFAULT_SUBSCRIBER_BUFFER
    subscriber_timeout_s: float = limits.DEFAULT_SUBSCRIBER_TIMEOUT_S
    event_ring: int = limits.DEFAULT_EVENT_RING
    admin_port: int = limits.DEFAULT_ADMIN_PORT
    max_connections: int = limits.DEFAULT_MAX_CONNECTIONS
    max_subscriptions: int = limits.DEFAULT_MAX_SUBSCRIPTIONS
    read_timeout_s: float = limits.DEFAULT_READ_TIMEOUT_S
    log_level: str = "info"
    log_format: str = "text"

    def __post_init__(self) -> None:
        checks = [
            (0 <= self.port <= 65_535, "port must be 0..65535 (0 picks a free port)"),
            (0 <= self.admin_port <= 65_535, "admin port must be 0..65535 (0 turns it off)"),
            (self.window_ms >= 1, "the coalescing window must be at least 1 ms"),
            (
                1024 <= self.max_payload <= limits.MAX_PAYLOAD_CEILING,
                "max payload must be 1024..4294967295 bytes",
            ),
            (self.max_liveness_ms >= 1, "max liveness must be at least 1 ms"),
            (self.tombstone_retention_s >= 0, "tombstone retention cannot be negative"),
            (self.subscriber_buffer >= 1, "the subscriber buffer must be at least 1 frame"),
            (self.subscriber_timeout_s > 0, "the subscriber timeout must be positive"),
            (self.event_ring >= 1, "the event ring must hold at least 1 event"),
            (self.max_connections >= 1, "max connections must be at least 1"),
            (self.max_subscriptions >= 1, "max subscriptions must be at least 1"),
            (self.read_timeout_s > 0, "the read timeout must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def replace(self, **changes: object) -> ServerConfig:
        """A copy with some settings changed."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
