"""`convergedb demo`: the model in a minute, on a server of its own.

The demo starts a server on a temporary directory (`convergedb serve --port 0 ...`, a
subprocess), three writer sources — game-server-1 and the matchmaker in this process,
game-server-2 in a process of its own so that it can be killed — and a read-only watcher
subscribed to the kind `player`, which prints every change the server sends it. Then it shows:

1. field ownership: game-server-1 ASSERTs a player, the matchmaker PATCHes only its `rating`;
   the watcher sees one merged entity asserted by both;
2. liveness: game-server-2 is killed (SIGKILL, with a 1 s liveness deadline); the entity only it
   asserted is deleted (cause liveness), the one the matchmaker asserts too stays alive;
3. epochs: game-server-1 restarts from a fresh snapshot of its own database, re-asserts it in
   an epoch, and EPOCH_END retracts the phantom it no longer has (cause epoch end).

It ends by itself in a few seconds, and stops its server and removes the directory whatever
happens (an error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final

import click

from ..client import (
    Change,
    ChangeType,
    Client,
    ConnectionLost,
    Connector,
    ConvergeError,
    DeleteCause,
    DynamicKindHandle,
    KindHandle,
    Subscription,
    connect,
)
from ..client.dynamic import Record
from ..declare import U16, String, kind
from ..ids import EntityId, id_from_str
from .tail import plural

LISTENING: Final = re.compile(r"^convergedb listening on (?P<host>\S+):(?P<port>\d+)")
START_TIMEOUT: Final = 20.0
"""Seconds the server (and the writer process) have to start."""
STOP_TIMEOUT: Final = 10.0
"""Seconds the server has to exit after SIGTERM before it gets SIGKILL."""
WAIT_TIMEOUT: Final = 15.0
"""Seconds the demo waits for the watcher to see a change before it gives up."""
LIVENESS_DEADLINE_MS: Final = 1000
"""game-server-2's liveness deadline: how long the server waits before cleaning up after it."""

GAME_SERVER_1: Final = 1
MATCHMAKER: Final = 2
GAME_SERVER_2: Final = 3
SOURCE_NAMES: Final = {
    GAME_SERVER_1: "game-server-1",
    MATCHMAKER: "matchmaker",
    GAME_SERVER_2: "game-server-2",
}


@kind("player")
class Player:
    """A player: the game server that hosts it owns name, server and hp; the matchmaker owns
    rating."""

    name: Annotated[str, String(0, max_length=32)] = ""
    server: Annotated[str, String(1, max_length=32)] = ""
    hp: Annotated[int, U16(2)] = 0
    rating: Annotated[int, U16(3)] = 0


def player_id(name: str) -> EntityId:
    """The entity id of a player: its name as a string key."""
    return id_from_str(f"player:{name}")


class DemoFailed(Exception):
    """Something the demo relies on did not happen; the message says what."""


# --- the command ------------------------------------------------------------------------------


@click.command(short_help="The model in a few seconds, on a temporary server.")
@click.option(
    "--pause",
    type=click.FloatRange(0),
    default=0.5,
    show_default=True,
    help="Seconds to pause between steps.",
)
def demo(pause: float) -> None:
    """Show how ConvergeDB works, on a temporary server of its own, in a few seconds.

    Three writers and a watcher show field ownership (one merged entity from two writers), a
    killed writer cleaned up by liveness, and an epoch removing phantom entities.
    """
    with tempfile.TemporaryDirectory(prefix="convergedb-demo-") as workdir:
        try:
            asyncio.run(run_demo(Path(workdir), pause))
        except KeyboardInterrupt:
            click.echo("\ndemo interrupted: its server is stopped and its data removed", err=True)
            raise SystemExit(130) from None
        except asyncio.CancelledError:  # SIGTERM
            raise SystemExit(143) from None
        except (DemoFailed, ConvergeError, OSError, TimeoutError) as exc:
            raise click.ClickException(f"the demo failed: {exc}") from None


async def run_demo(workdir: Path, pause: float) -> None:
    """Start the server, run the steps, stop the server (whatever happens)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):  # no signal handlers on some platforms
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    server = await DemoServer.start(workdir)
    try:
        await Demo(server, pause).run()
    finally:
        await server.stop()
        with contextlib.suppress(NotImplementedError):
            loop.remove_signal_handler(signal.SIGTERM)


# --- the server and game-server-2, as processes -----------------------------------------------


class DemoServer:
    """`convergedb serve` on a temporary data directory, in a subprocess."""

    def __init__(self, process: asyncio.subprocess.Process, workdir: Path) -> None:
        self.process = process
        self.workdir = workdir
        self.host = ""
        self.port = 0
        self._drain: asyncio.Task[None] | None = None

    @property
    def log_path(self) -> Path:
        """Where the server's log (its stderr) goes."""
        return self.workdir / "server.log"

    @classmethod
    async def start(cls, workdir: Path) -> DemoServer:
        """Start the server and wait for its `convergedb listening on HOST:PORT` line."""
        command = [
            *(sys.executable, "-m", "convergedb", "serve"),
            *("--port", "0", "--admin-port", "0"),
            *("--data-dir", str(workdir / "data")),
            *("--tombstone-retention", "2", "--log-level", "warning"),
        ]
        with (workdir / "server.log").open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *command,
                cwd=workdir,  # not the caller's directory: its modules must not shadow ours
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        server = cls(process, workdir)
        try:
            server.host, server.port = await server._listening_address()
        except BaseException:
            await server.stop()
            raise
        server._drain = asyncio.create_task(server._drain_stdout())
        return server

    async def _listening_address(self) -> tuple[str, int]:
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while line := await self.process.stdout.readline():
                    match = LISTENING.match(line.decode(errors="replace"))
                    if match:
                        return match["host"], int(match["port"])
        except TimeoutError:
            raise DemoFailed(
                f"the server did not start within {START_TIMEOUT:g} s\n{self.log_tail()}"
            ) from None
        status = await self.process.wait()
        raise DemoFailed(f"the server exited with status {status}\n{self.log_tail()}")

    async def _drain_stdout(self) -> None:
        """Keep reading stdout, so that the server never blocks on a full pipe."""
        assert self.process.stdout is not None
        while await self.process.stdout.readline():
            pass

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for error messages."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it has not exited in time."""
        await stop_process(self.process)
        if self._drain is not None:
            self._drain.cancel()


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """End a subprocess: SIGTERM, then SIGKILL after `STOP_TIMEOUT` (shielded from the
    cancellation of the caller, so that Ctrl-C still stops it)."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.shield(asyncio.wait_for(process.wait(), STOP_TIMEOUT))
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())


def doomed_writer_main() -> None:
    """game-server-2, run in its own process (`python -c ...` with HOST PORT as arguments):
    asserts bo and cy, says `ready`, and waits to be killed."""
    host, port = sys.argv[1], int(sys.argv[2])
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_doomed_writer(host, port))


async def _doomed_writer(host: str, port: int) -> None:
    async with connect(
        host,
        port,
        source_id=GAME_SERVER_2,
        name=SOURCE_NAMES[GAME_SERVER_2],
        liveness_deadline_ms=LIVENESS_DEADLINE_MS,
        heartbeat_interval_ms=LIVENESS_DEADLINE_MS // 4,
        reconnect=False,
    ) as client:
        players = await client.register_kind(Player)
        async with client.batch() as batch:
            for name, hp in (("bo", 100), ("cy", 90)):
                batch.assert_(players, player_id(name), Player(name, "game-server-2", hp))
        await client.sync()
        print("ready", flush=True)
        await asyncio.Event().wait()


async def start_doomed_writer(server: DemoServer) -> asyncio.subprocess.Process:
    """Start game-server-2 in its own process and wait until its players are written."""
    code = "from convergedb.cli.demo import doomed_writer_main; doomed_writer_main()"
    log_path = server.workdir / "game-server-2.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", code, server.host, str(server.port)),
            cwd=server.workdir,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT):
            ready = await process.stdout.readline()
    except TimeoutError:
        ready = b""
    if ready.strip() != b"ready":
        await stop_process(process)
        raise DemoFailed(f"game-server-2 did not start:\n{log_path.read_text(errors='replace')}")
    return process


# --- the watcher ------------------------------------------------------------------------------


class Watcher:
    """The read-only subscriber: prints each change it is sent, and lets the demo wait for
    one."""

    def __init__(self, names: dict[EntityId, str]) -> None:
        self.names = names
        self.changes: list[Change[Record]] = []
        self.ended: BaseException | None = None
        """Why the subscription ended early (the server went away), if it did."""
        self._arrived = asyncio.Event()

    async def follow(self, subscription: Subscription[Record]) -> None:
        """Print and keep every change of the subscription (run as a task)."""
        try:
            async for item in subscription:
                if isinstance(item, Change):
                    self.changes.append(item)
                    say(f"    watcher: {self.describe(item)}", fg="cyan")
                    self._arrived.set()
            self.ended = ConnectionLost("the subscription ended")
        except ConvergeError as exc:
            self.ended = exc
        self._arrived.set()

    def describe(self, change: Change[Record]) -> str:
        """One change, for people."""
        who = self.names.get(change.entity_id, change.entity_id.hex()[:12])
        head = f"{change.type.name:<7} {who:<4} v{change.version}"
        if change.type is ChangeType.DELETED:
            cause = change.cause.name.lower().replace("_", " ") if change.cause is not None else ""
            return f"{head}  (cause: {cause})"
        value = change.value or {}
        if change.type is ChangeType.UPDATED:
            shown = {n: value[n] for n in change.changed_field_names}
        else:
            shown = {n: v for n, v in value.items() if n != "name"}  # the name leads the line
        fields = " ".join(f"{n}={v!r}" for n, v in shown.items())
        return f"{head}  [{source_names(change.source_set)}]  {fields}"

    async def wait_for(
        self, change_type: ChangeType, name: str, timeout: float = WAIT_TIMEOUT
    ) -> Change[Record]:
        """The first change of `change_type` to player `name` (waiting for it if need be)."""
        eid = player_id(name)

        def match(c: Change[Record]) -> bool:
            return c.type is change_type and c.entity_id == eid

        try:
            async with asyncio.timeout(timeout):
                return await self._first(match)
        except TimeoutError:
            raise DemoFailed(
                f"the watcher did not see {change_type.name} {name} within {timeout:g} s"
            ) from None

    async def _first(self, match: Callable[[Change[Record]], bool]) -> Change[Record]:
        checked = 0
        while True:
            for change in self.changes[checked:]:
                if match(change):
                    return change
            checked = len(self.changes)
            if self.ended is not None:
                raise DemoFailed(f"the watcher's subscription ended: {self.ended}")
            self._arrived.clear()
            await self._arrived.wait()


def source_names(source_set: int) -> str:
    """The names of the sources in a source set: `game-server-1 + matchmaker`."""
    ids = [bit for bit in range(64) if source_set >> bit & 1]
    return " + ".join(SOURCE_NAMES.get(i, f"source {i}") for i in ids) or "none"


def say(*lines: str, **style: Any) -> None:
    """Lines of the demo's story (an empty line when none is given)."""
    for line in lines or ("",):
        click.secho(line, **style)
    sys.stdout.flush()


# --- the steps --------------------------------------------------------------------------------


@dataclass
class Writers:
    """The two writers that live in this process."""

    game_server: Client
    game_server_players: KindHandle[Player]
    matchmaker: Client
    matchmaker_players: KindHandle[Player]


class Demo:
    """The demo's steps, against a running server."""

    def __init__(self, server: DemoServer, pause: float) -> None:
        self.server = server
        self.pause = pause
        self.names = {player_id(n): n for n in ("ana", "bo", "cy", "dan", "eve", "fay")}
        self.watcher = Watcher(self.names)
        self.upstream: dict[str, Player] = {}
        """game-server-1's own database: the players it hosts."""

    async def run(self) -> None:
        """Every step, with the clients opened and closed around them."""
        server = self.server
        self.introduce()
        async with contextlib.AsyncExitStack() as stack:
            game_server = await stack.enter_async_context(self.writer(GAME_SERVER_1))
            matchmaker = await stack.enter_async_context(self.writer(MATCHMAKER))
            writers = Writers(
                game_server,
                await game_server.register_kind(Player),
                matchmaker,
                await matchmaker.register_kind(Player),
            )
            reader = await stack.enter_async_context(
                connect(server.host, server.port, read_only=True, name="watcher", reconnect=False)
            )
            players = await reader.kind("player")
            subscription = await stack.enter_async_context(
                players.subscribe(bootstrap=False, reconnect=False)
            )
            follower = asyncio.create_task(self.watcher.follow(subscription))
            stack.callback(follower.cancel)
            await self.field_ownership(writers, players)
            await self.liveness(writers, players)
            await self.epoch(writers, stack)
            await self.conclude(players)

    def writer(self, source_id: int) -> Connector:
        """A writer client claiming `source_id` (its connector: use it with `async with`)."""
        return connect(
            self.server.host,
            self.server.port,
            source_id=source_id,
            name=SOURCE_NAMES[source_id],
            reconnect=False,
        )

    async def step(self, title: str) -> None:
        """Pause, then the title of the next step."""
        await asyncio.sleep(self.pause)
        say()
        say(title, bold=True)

    def introduce(self) -> None:
        """Who is who."""
        say("ConvergeDB demo", bold=True)
        say(
            f"A server listens on {self.server.host}:{self.server.port}, its data in "
            f"{self.server.workdir}",
            "(a temporary directory, removed at the end). Three writers, each a source:",
            "  source 1  game-server-1  hosts players: owns their name, server and hp",
            "  source 2  matchmaker     rates players: owns their rating",
            "  source 3  game-server-2  hosts players too (in a process of its own)",
            "A read-only watcher subscribes to the kind `player` and prints each change",
            "the server pushes to it.",
        )

    async def field_ownership(self, writers: Writers, players: DynamicKindHandle) -> None:
        """Step 1: one ASSERT and one PATCH from two sources make one merged entity."""
        await self.step("1. Field ownership: two writers, one merged entity")
        say("game-server-1 ASSERTs the full record of player ana:")
        ana = Player("ana", "game-server-1", 100, 0)
        self.upstream["ana"] = ana
        await writers.game_server_players.assert_(player_id("ana"), ana)
        await writers.game_server.sync()
        await self.watcher.wait_for(ChangeType.CREATED, "ana")
        say("The matchmaker PATCHes only the field it owns, rating:")
        await writers.matchmaker_players.patch(player_id("ana"), rating=1520)
        await writers.matchmaker.sync()
        await self.watcher.wait_for(ChangeType.UPDATED, "ana")
        say(
            "game-server-1 PATCHes hp (from now on it PATCHes its own fields, so that it",
            "never overwrites the matchmaker's rating with a full record):",
        )
        ana.hp = 80
        await writers.game_server_players.patch(player_id("ana"), hp=80)
        await writers.game_server.sync()
        await self.watcher.wait_for(ChangeType.UPDATED, "ana")
        result = await players.query(player_id("ana"))
        say(
            f"Reading ana back: ONE entity, version {result.version}, asserted by "
            f"{source_names(result.source_set)}:"
        )
        say(f"  {result.value}")
        say(
            "Nobody arbitrated: each source asserts the fields it owns, the server merges",
            "them, and subscribers see one entity.",
        )

    async def liveness(self, writers: Writers, players: DynamicKindHandle) -> None:
        """Step 2: a killed writer's entities go away, unless another source asserts them."""
        await self.step("2. Liveness: a writer dies, the server cleans up after it")
        say(
            f"game-server-2 starts (its own process, liveness deadline {LIVENESS_DEADLINE_MS} "
            "ms) and ASSERTs",
            "players bo and cy:",
        )
        process = await start_doomed_writer(self.server)
        try:
            await self.watcher.wait_for(ChangeType.CREATED, "bo")
            await self.watcher.wait_for(ChangeType.CREATED, "cy")
            say("The matchmaker rates cy, so cy is now asserted by two sources:")
            await writers.matchmaker_players.patch(player_id("cy"), rating=1400)
            await writers.matchmaker.sync()
            await self.watcher.wait_for(ChangeType.UPDATED, "cy")
            say(f"Killing game-server-2 with SIGKILL (pid {process.pid}): no goodbye, no RETRACT.")
            killed_at = time.monotonic()
            process.kill()
            await process.wait()
        finally:
            await stop_process(process)
        deleted = await self.watcher.wait_for(ChangeType.DELETED, "bo")
        elapsed = time.monotonic() - killed_at
        if deleted.cause is not DeleteCause.LIVENESS:
            raise DemoFailed(f"bo was deleted with cause {deleted.cause!r}, not liveness")
        say(
            f"{elapsed:.1f} s after the kill (its liveness deadline, plus at most a window and a",
            "second), the server retracted everything game-server-2 asserted, in one flush:",
            "  bo, asserted by game-server-2 alone, is deleted (cause: liveness);",
        )
        cy = await players.query(player_id("cy"))
        if not cy.alive:
            raise DemoFailed("cy should still be alive: the matchmaker asserts it")
        say(
            f"  cy stays alive, asserted by the {source_names(cy.source_set)} alone now, its "
            f"data as it was (v{cy.version}):",
            f"    {cy.value}",
            "  (a change of the source set alone bumps no version and sends no notification;",
            "  a query shows it)",
        )

    async def epoch(self, writers: Writers, stack: contextlib.AsyncExitStack) -> None:
        """Step 3: a restarted writer re-asserts its snapshot in an epoch; the phantom goes."""
        await self.step("3. Epochs: a writer restarts and drops its phantoms")
        say("game-server-1 starts hosting dan, eve and fay (one batch, one flush):")
        async with writers.game_server.batch() as batch:
            for name in ("dan", "eve", "fay"):
                player = Player(name, "game-server-1", 100)
                self.upstream[name] = player
                batch.assert_(writers.game_server_players, player_id(name), player)
        await writers.game_server.sync()
        for name in ("dan", "eve", "fay"):
            await self.watcher.wait_for(ChangeType.CREATED, name)

        say(
            "game-server-1 restarts. It reconnects as source 1 within its liveness deadline,",
            "so it keeps its entities.",
        )
        await writers.game_server.close()
        client = await stack.enter_async_context(
            connect(
                self.server.host,
                self.server.port,
                source_id=GAME_SERVER_1,
                takeover=True,  # its old connection may not be noticed as gone yet
                name=SOURCE_NAMES[GAME_SERVER_1],
                reconnect=False,
            )
        )
        handle = await client.register_kind(Player)
        del self.upstream["fay"]
        say(
            "But its own database now lists ana, dan and eve: fay left while it was down.",
            "Nothing would ever retract fay: a phantom. So game-server-1 begins an epoch,",
            "re-asserts its whole snapshot (PATCHes of the fields it owns, in one batch), and",
            "ends the epoch:",
        )
        async with client.epoch() as epoch, client.batch() as batch:
            for name, player in self.upstream.items():
                owned = {"name": player.name, "server": player.server, "hp": player.hp}
                batch.patch(handle, player_id(name), owned)
        retracted = epoch.retracted
        deleted = await self.watcher.wait_for(ChangeType.DELETED, "fay")
        if deleted.cause is not DeleteCause.EPOCH_END:
            raise DemoFailed(f"fay was deleted with cause {deleted.cause!r}, not epoch end")
        say(
            f"EPOCH_END answered {retracted}: the server retracted {plural(retracted, 'entity')} "
            "that game-server-1",
            "asserted before the epoch and did not re-assert during it. Re-asserting identical",
            "data changed nothing else: no other notification.",
        )

    async def conclude(self, players: DynamicKindHandle) -> None:
        """What is left, and what to try next."""
        await self.step("Done. The players now:")
        for name in ("ana", "bo", "cy", "dan", "eve", "fay"):
            result = await players.query(player_id(name))
            if result.alive:
                say(f"  {name:<4} v{result.version}  {source_names(result.source_set)}")
            else:
                say(f"  {name:<4} {result.status.name.lower()}")
        say(
            "(this server keeps tombstones 2 s, then compacts them; the default is 5 minutes)",
            "",
            "An entity lives while at least one source asserts it; writers never coordinate.",
            "Try it yourself: `convergedb serve` in one terminal, then",
            "`convergedb watch player --bootstrap` and `convergedb status` in another.",
        )
