"""Source epochs through the SDK: epoch_begin / epoch_end and `async with client.epoch()`."""

from __future__ import annotations

import pytest

import convergedb as cdb
from convergedb.client import EpochNotOpen, ReadOnlyError
from kinds import Player
from server_fixture import ServerProcess


async def test_an_epoch_block_retracts_what_was_not_reasserted(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, source_id=1) as client:
        players = await client.register_kind(Player)
        async with client.batch() as batch:
            for i in range(10):
                batch.assert_(players, i, Player(name=f"p{i}"))
        async with client.epoch() as epoch, client.batch() as batch:
            for i in range(7):  # the new snapshot has 7 of the 10
                batch.assert_(players, i, Player(name=f"p{i}"))
        assert (epoch.baseline, epoch.retracted) == (10, 3)
        await client.sync()
        assert (await players.query(6)).alive
        assert not (await players.query(7)).alive


async def test_begin_end_and_errors(server: ServerProcess) -> None:
    async with cdb.connect(server.host, server.port, source_id=2) as client:
        players = await client.register_kind(Player)
        await players.assert_(1, Player(name="x"))
        assert await client.epoch_begin() == 1
        assert await client.epoch_end() == 1
        with pytest.raises(EpochNotOpen):
            await client.epoch_end()
    async with cdb.connect(server.host, server.port, read_only=True) as reader:
        with pytest.raises(ReadOnlyError):
            await reader.epoch_begin()
