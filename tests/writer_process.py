"""A writer in its own process, for liveness tests that kill it with SIGKILL.

    python writer_process.py PORT SOURCE_ID DEADLINE_MS KIND_ID FIRST COUNT

Asserts entities FIRST..FIRST+COUNT-1 (rows of tests/kinds.Player), waits for SYNC, prints
"ready" and then does nothing (it never heartbeats: the test kills it).
"""

from __future__ import annotations

import asyncio
import sys

from convergedb import id_from_int
from convergedb.protocol import Assert, Batch, ConnectMode
from kinds import PLAYER, Player
from wire_client import WireClient


async def main(
    port: int, source_id: int, deadline_ms: int, kind: int, first: int, count: int
) -> None:
    client = await WireClient.open("127.0.0.1", port)
    await client.connect(
        ConnectMode.CLAIM, source_id=source_id, liveness_deadline_ms=deadline_ms,
        heartbeat_interval_ms=deadline_ms // 2, name=f"writer-{source_id}",
    )  # fmt: skip
    row = PLAYER.encode(Player(name=f"from {source_id}"))
    client.send(
        Batch(tuple(Assert(kind, id_from_int(i), row) for i in range(first, first + count)))
    )
    await client.sync()
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*(int(arg) for arg in sys.argv[1:7])))  # type: ignore[arg-type]
