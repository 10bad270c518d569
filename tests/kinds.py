"""Kinds shared by the server tests."""

from __future__ import annotations

from typing import Annotated

import convergedb as cdb


@cdb.struct
class Vec2:
    x: Annotated[float, cdb.F32(0)] = 0.0
    y: Annotated[float, cdb.F32(1)] = 0.0


@cdb.kind("player")
class Player:
    name: Annotated[str, cdb.String(0, max_length=32)] = ""
    hp: Annotated[int, cdb.U16(1)] = 0
    pos: Annotated[Vec2, cdb.Struct(2)] = Vec2()
    alive: Annotated[bool, cdb.Bool(3)] = False
    items: Annotated[list[int], cdb.Array(4, cdb.U32(), max_count=16)] = []


@cdb.kind("match")
class Match:
    map_name: Annotated[str, cdb.String(0, max_length=16, fixed=True)] = ""
    players: Annotated[int, cdb.U8(1)] = 0


PLAYER = cdb.kind_model(Player)
MATCH = cdb.kind_model(Match)
