"""A real ConvergeDB server in a subprocess, for tests.

    async with running_server(tmp_path, "--max-payload", "65536") as server:
        client = await connect(server.host, server.port)

The server runs as `python -m convergedb serve --port 0 --data-dir DIR --admin-port 0 [args]`
(arguments given later win, so a test may pass its own `--admin-port`). The fixture waits for
the line `convergedb listening on HOST:PORT` on its stdout. stdout and stderr are kept in files
under `tmp_path`; when the server dies or does not start in time, the error carries the tail of
both. On exit the server gets SIGTERM, then SIGKILL if it has not exited after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

START_TIMEOUT = 15.0
"""Seconds a server has to print its listening line."""
STOP_TIMEOUT = 10.0
"""Seconds a server has to exit after SIGTERM before it gets SIGKILL."""
LISTENING = re.compile(r"^convergedb listening on (?P<host>\S+):(?P<port>\d+)")
TAIL_LINES = 40


class ServerFailed(RuntimeError):
    """The server did not start, or exited unexpectedly; the message has its output's tail."""


class ServerProcess:
    """A server subprocess: where it listens, its data directory, and how to stop it."""

    def __init__(self, tmp_path: Path, args: tuple[str, ...], data_dir: Path | None = None) -> None:
        self.workdir = tmp_path
        self.data_dir = data_dir if data_dir is not None else tmp_path / "data"
        self.args = args
        self.host = ""
        self.port = 0
        self.stdout_path = tmp_path / "server-stdout.log"
        self.stderr_path = tmp_path / "server-stderr.log"
        self.process: asyncio.subprocess.Process | None = None
        self._stdout_task: asyncio.Task[None] | None = None
        self._starts = 0
        self._ended_by_test = False

    def __repr__(self) -> str:
        return f"<ServerProcess {self.host}:{self.port} data={self.data_dir}>"

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to connect to."""
        return self.host, self.port

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self.process is not None and self.process.returncode is None

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the server and wait until it listens. The first start picks a free port;
        restarts reuse it, so clients can reconnect to the same address."""
        if self.running:
            raise RuntimeError("the server is already running")
        self._starts += 1
        self._ended_by_test = False
        port = str(self.port) if self.port else "0"
        command = [
            sys.executable,
            "-m",
            "convergedb",
            "serve",
            "--port",
            port,
            "--data-dir",
            str(self.data_dir),
            "--admin-port",
            "0",
            *self.args,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.stderr_path.open("ab") as stderr:
            self._mark(stderr, f"start {self._starts}: {' '.join(command)}")
            self.process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=self.workdir,
                env=env,
            )
        try:
            async with asyncio.timeout(START_TIMEOUT):
                host, port_number = await self._read_listening_line()
        except TimeoutError:
            await self._terminate()
            raise ServerFailed(
                f"the server did not print 'convergedb listening on HOST:PORT' within "
                f"{START_TIMEOUT} s\n{self.output_tail()}"
            ) from None
        self.host, self.port = host, port_number
        self._stdout_task = asyncio.create_task(self._copy_stdout())

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after `STOP_TIMEOUT`; return the exit status (None if it was
        never started)."""
        return await self._terminate()

    async def kill(self) -> int | None:
        """SIGKILL the server at once (a crash) and wait for it to be gone."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            self._ended_by_test = True
            process.send_signal(signal.SIGKILL)
        status = await process.wait()
        await self._finish_stdout()
        return status

    async def restart(self) -> None:
        """Stop the server (SIGTERM) if it runs, then start it again on the same port and data."""
        await self.stop()
        await self.start()

    def check_alive(self) -> None:
        """Raise `ServerFailed`, with the output's tail, if the server exited on its own (not
        stopped or killed by the test)."""
        if (
            self.process is not None
            and self.process.returncode is not None
            and not self._ended_by_test
        ):
            raise ServerFailed(
                f"the server exited with status {self.process.returncode}\n{self.output_tail()}"
            )

    def output_tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines of the server's stderr and stdout, for error messages."""
        parts = []
        for label, path in (("stderr", self.stderr_path), ("stdout", self.stdout_path)):
            text = path.read_text(errors="replace") if path.exists() else ""
            tail = "\n".join(text.splitlines()[-lines:])
            parts.append(f"--- server {label} ({path}), last {lines} lines ---\n{tail}")
        return "\n".join(parts)

    # --- internals ----------------------------------------------------------------------------

    async def _read_listening_line(self) -> tuple[str, int]:
        assert self.process is not None and self.process.stdout is not None
        with self.stdout_path.open("ab") as out:
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    status = await self.process.wait()
                    raise ServerFailed(
                        f"the server exited with status {status} before listening\n"
                        f"{self.output_tail()}"
                    )
                out.write(line)
                out.flush()
                match = LISTENING.match(line.decode(errors="replace"))
                if match:
                    return match["host"], int(match["port"])

    async def _copy_stdout(self) -> None:
        """Keep reading stdout into its file, so the server never blocks on a full pipe."""
        assert self.process is not None and self.process.stdout is not None
        with self.stdout_path.open("ab") as out:
            while line := await self.process.stdout.readline():
                out.write(line)
                out.flush()

    async def _finish_stdout(self) -> None:
        task, self._stdout_task = self._stdout_task, None
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _terminate(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            self._ended_by_test = True
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await process.wait()
            except TimeoutError:
                process.send_signal(signal.SIGKILL)
                await process.wait()
        await self._finish_stdout()
        return process.returncode

    @staticmethod
    def _mark(stream: IO[bytes], text: str) -> None:
        stream.write(f"=== {text}\n".encode())
        stream.flush()


@contextlib.asynccontextmanager
async def running_server(
    tmp_path: Path, *args: str, data_dir: Path | None = None
) -> AsyncIterator[ServerProcess]:
    """Start a server with `args` (extra `convergedb serve` flags), yield it, stop it on exit."""
    server = ServerProcess(tmp_path, tuple(args), data_dir)
    await server.start()
    try:
        yield server
    except BaseException:
        await server.stop()
        raise
    server.check_alive()
    await server.stop()
