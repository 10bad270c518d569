"""Helpers shared by the SDK tests."""

from __future__ import annotations

import asyncio

import convergedb as cdb

TIMEOUT = 10.0


class Errors:
    """Collects what `on_error` receives and lets a test wait for it."""

    def __init__(self) -> None:
        self.received: list[cdb.ConvergeError] = []
        self._arrived = asyncio.Event()

    def __call__(self, error: cdb.ConvergeError) -> None:
        self.received.append(error)
        self._arrived.set()

    async def wait(self, count: int = 1) -> cdb.ConvergeError:
        """The `count`-th error, once it has arrived."""
        async with asyncio.timeout(TIMEOUT):
            while len(self.received) < count:
                self._arrived.clear()
                await self._arrived.wait()
        return self.received[count - 1]
