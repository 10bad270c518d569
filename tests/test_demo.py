"""`convergedb demo` runs to completion, shows each step, and leaves nothing behind."""

from __future__ import annotations

import re
from pathlib import Path

from test_cli import cli


async def test_the_demo_runs_every_step_and_cleans_up() -> None:
    status, out, err = await cli("demo", "--pause", "0")
    assert status == 0, f"{out}\n{err}"

    steps = [line for line in out.splitlines() if re.match(r"^\d\. ", line)]
    assert [s.split(":")[0] for s in steps] == ["1. Field ownership", "2. Liveness", "3. Epochs"]
    # 1: one entity asserted by both writers, each with its own field
    assert "UPDATED ana  v2  [game-server-1 + matchmaker]  rating=1520" in out
    assert "'hp': 80, 'rating': 1520" in out
    # 2: the killed writer's own entity is deleted by liveness, the shared one stays
    assert "DELETED bo   v2  (cause: liveness)" in out
    assert "cy stays alive, asserted by the matchmaker alone" in out
    # 3: the epoch retracts the phantom
    assert "DELETED fay  v2  (cause: epoch end)" in out
    assert "EPOCH_END answered 1" in out
    assert "Done." in out

    (workdir,) = re.findall(r"its data in (\S+)", out)
    assert not Path(workdir).exists()
