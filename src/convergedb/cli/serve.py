"""`convergedb serve`: every setting from a flag, a CONVERGEDB_<NAME> variable or a TOML file.

Precedence: flags > environment > config file > defaults.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .. import limits
from ..server.config import ServerConfig, TokenGrant


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """Read the TOML file first, as the defaults the other options start from."""
    if value is None:
        return
    try:
        data = tomllib.loads(Path(value).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"cannot read {value}: {exc}") from None
    section = data.get("serve", data)
    names = {
        opt.lstrip("-").replace("-", "_"): param.name
        for param in ctx.command.params
        for opt in param.opts
        if param.name is not None and param.name != "config"
    }
    names.update({name: name for name in names.values()})
    unknown = sorted(key for key in section if key.replace("-", "_") not in names)
    if unknown:
        raise click.BadParameter(f"{value}: unknown settings {', '.join(unknown)}")
    ctx.default_map = {names[key.replace("-", "_")]: item for key, item in section.items()}


def _tokens(_ctx: click.Context, _param: click.Parameter, values: Any) -> tuple[TokenGrant, ...]:
    items = values.split() if isinstance(values, str) else list(values or ())
    try:
        return tuple(TokenGrant.parse(item) for item in items)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


FC = TypeVar("FC", bound=Callable[..., Any])


def _option(*names: str, **kwargs: Any) -> Callable[[FC], FC]:
    """A server setting: a flag, also read from CONVERGEDB_<NAME>."""
    flag = names[0].split("/")[0].lstrip("-")
    envvar = "CONVERGEDB_" + flag.replace("-", "_").upper()
    return click.option(*names, envvar=envvar, show_default=True, show_envvar=True, **kwargs)


@click.command()
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    callback=_load_config_file,
    is_eager=True,
    expose_value=False,
    envvar="CONVERGEDB_CONFIG",
    help="A TOML file of settings (keys as the flag names, optionally under [serve]).",
)
@_option("--host", default=limits.DEFAULT_HOST, help="Address to listen on.")
@_option(
    "--port",
    type=click.IntRange(0, 65535),
    default=limits.DEFAULT_PORT,
    help="Port to listen on (0 picks a free port).",
)
@_option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=limits.DEFAULT_DATA_DIR,
    help="Where the store lives (created on first start).",
)
@_option(
    "--window-ms",
    type=click.IntRange(1),
    default=limits.DEFAULT_WINDOW_MS,
    help="Coalescing window: writes are flushed this often.",
)
@_option(
    "--fsync/--no-fsync",
    default=True,
    help="fsync every flush (durable), or leave syncing to the OS (faster).",
)
@_option(
    "--max-payload",
    type=click.IntRange(1024, limits.MAX_PAYLOAD_CEILING),
    default=limits.DEFAULT_MAX_PAYLOAD,
    help="Largest frame payload accepted, in bytes.",
)
@_option(
    "--token",
    "tokens",
    multiple=True,
    callback=_tokens,
    help="ROLE:TOKEN[:SOURCES], repeatable; roles admin, writer, reader; SOURCES like 1,2,5. "
    "With no token anyone may connect.",
)
@_option(
    "--max-liveness-ms",
    type=click.IntRange(1),
    default=limits.DEFAULT_MAX_LIVENESS_MS,
    help="Cap on the liveness deadline clients declare.",
)
@_option(
    "--tombstone-retention",
    type=click.FloatRange(0),
    default=limits.DEFAULT_TOMBSTONE_RETENTION_S,
    help="Seconds a tombstone stays visible before compaction.",
)
@_option(
    "--subscriber-buffer",
    type=click.IntRange(1),
    default=limits.DEFAULT_SUBSCRIBER_BUFFER,
    help="Frames queued per subscriber socket before its changes are merged.",
)
@_option(
    "--subscriber-timeout",
    type=click.FloatRange(0, min_open=True),
    default=limits.DEFAULT_SUBSCRIBER_TIMEOUT_S,
    help="Seconds a subscriber may read nothing while output is pending.",
)
@_option(
    "--event-ring",
    type=click.IntRange(1),
    default=limits.DEFAULT_EVENT_RING,
    help="Events kept per event-stream kind.",
)
@_option(
    "--admin-port",
    type=click.IntRange(0, 65535),
    default=limits.DEFAULT_ADMIN_PORT,
    help="Admin HTTP port for metrics and health (0 = off).",
)
@_option(
    "--max-connections",
    type=click.IntRange(1),
    default=limits.DEFAULT_MAX_CONNECTIONS,
    help="Most client connections at once.",
)
@_option(
    "--max-subscriptions",
    type=click.IntRange(1),
    default=limits.DEFAULT_MAX_SUBSCRIPTIONS,
    help="Most live subscriptions (state and event) per connection.",
)
@_option(
    "--read-timeout",
    type=click.FloatRange(0, min_open=True),
    default=limits.DEFAULT_READ_TIMEOUT_S,
    help="Seconds a new connection has to send CONNECT, and a frame may stall half-received.",
)
@_option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    help="Log verbosity.",
)
@_option(
    "--log-format", type=click.Choice(["text", "json"]), default="text", help="Log line format."
)
def serve(**settings: Any) -> None:
    """Start a ConvergeDB server (in the foreground, until SIGTERM or SIGINT)."""
    from ..server import logs
    from ..server.app import run
    from ..server.storage import StoreError

    settings["tombstone_retention_s"] = settings.pop("tombstone_retention")
    settings["subscriber_timeout_s"] = settings.pop("subscriber_timeout")
    settings["read_timeout_s"] = settings.pop("read_timeout")
    try:
        config = ServerConfig(**settings)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure(config.log_level, config.log_format)
    try:
        status = run(config)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {config.host}:{config.port}: {exc}") from None
    raise SystemExit(status)
