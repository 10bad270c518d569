"""Subscriptions: live notifications, bootstrap, resume, slow-subscriber merging, event streams.

(To be built: issue 5.) The connection delegates SUBSCRIBE, UNSUBSCRIBE and SUBSCRIBE_EVENTS here,
and tells the hub when its socket backs up or drains and when it goes away.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..protocol.codes import ErrorCode
from ..protocol.errors import ProtocolError
from ..protocol.frame import Frame

if TYPE_CHECKING:
    from .app import Server
    from .connection import ServerConnection


class SubscriptionHub:
    """Every subscription of the server, fed by the engine after each flush."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def on_subscribe(self, connection: ServerConnection, frame: Frame) -> None:
        """SUBSCRIBE: register, reply OK, then bootstrap if asked."""
        raise ProtocolError(ErrorCode.INTERNAL, "subscriptions are not built yet", frame.opcode)

    def on_unsubscribe(self, connection: ServerConnection, frame: Frame) -> None:
        """UNSUBSCRIBE: end a state or event subscription of this connection."""
        raise ProtocolError(ErrorCode.INTERNAL, "subscriptions are not built yet", frame.opcode)

    def on_subscribe_events(self, connection: ServerConnection, frame: Frame) -> None:
        """SUBSCRIBE_EVENTS: deliver an event-stream kind's events from a sequence number."""
        raise ProtocolError(ErrorCode.INTERNAL, "event streams are not built yet", frame.opcode)

    def pause(self, connection: ServerConnection) -> None:
        """The connection's socket is backed up (the transport called pause_writing)."""

    def resume(self, connection: ServerConnection) -> None:
        """The connection's socket drained (the transport called resume_writing)."""

    def drop(self, connection: ServerConnection) -> None:
        """The connection is gone: end its subscriptions."""

    def close(self) -> None:
        """The server stops."""
