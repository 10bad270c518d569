"""`convergedb watch` and `convergedb events`: follow a kind live, decoded with the server's own
schema (no Python class needed).

Both open a read-only connection, print a first line once the server has accepted the
subscription (`SUBSCRIBED` with --json: a script may start writing from then on and miss
nothing), then one line per change (or event). `--count N` exits after N of them, `--timeout S`
after S seconds (status 1 if --count was not reached by then); Ctrl-C ends them quietly.

A lost connection is re-established by the SDK (with backoff, for as long as it takes), and the
tail goes on where it was: `watch` resumes from the last change it received (a `reconnected`
line, then what changed meanwhile), `events` from the next event.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import click

from ..client import (
    BootstrapComplete,
    BootstrapStarted,
    Change,
    ChangeType,
    Client,
    ConvergeError,
    DynamicKindHandle,
    EventItem,
    EventOp,
    Resubscribed,
    SubscriptionItem,
    UnknownKind,
    connect,
    decode_metadata,
    is_metadata,
)
from ..client.dynamic import Record
from ..protocol.codes import DeleteCause, EventCause
from .common import connection_options, run, to_json

CLIENT_NAME = "convergedb-cli"
SHORT_ID_BYTES = 8
"""Ids up to this many bytes (zeros on the right trimmed) are printed whole for people."""


# --- options and the run loop shared by both commands ---------------------------------------


@dataclass(frozen=True, slots=True)
class TailOptions:
    """Where to connect, how to print, and when to stop."""

    host: str
    port: int
    token: str
    as_json: bool
    count: int | None
    timeout: float | None


def count_option(help_text: str) -> Callable[[Any], Any]:
    """--count N."""
    return click.option("--count", type=click.IntRange(0), default=None, help=help_text)


def timeout_option(command: Any) -> Any:
    """--timeout S."""
    return click.option(
        "--timeout",
        type=click.FloatRange(0, min_open=True),
        default=None,
        help="Exit after S seconds (with status 1 if --count was not reached).",
    )(command)


def run_tail(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run a tail: Ctrl-C and a closed pipe end it quietly (status 0); server errors are
    clear CLI errors (status 1)."""
    try:
        run(coroutine)
    except KeyboardInterrupt:
        return
    except BrokenPipeError:
        _silence_stdout()
    except (ConvergeError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None


def _silence_stdout() -> None:
    """The reader of stdout went away (`| head`): drop what is still buffered."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


@asynccontextmanager
async def reader_for(options: TailOptions) -> AsyncIterator[Client]:
    """A read-only client of the server."""
    async with connect(
        options.host, options.port, read_only=True, token=options.token, name=CLIENT_NAME
    ) as client:
        yield client


async def resolve(client: Client, kind: str) -> DynamicKindHandle:
    """The kind's handle from the server's schema, or a CLI error listing the kinds there are."""
    try:
        return await client.kind(kind)
    except UnknownKind:
        known = ", ".join(sorted(info.kind.name for info in await client.list_kinds()))
        raise click.ClickException(f"no kind named {kind!r} (kinds: {known or 'none'})") from None


class Counter:
    """Counts the changes (or events) printed against --count."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.seen = 0

    def add(self) -> bool:
        """Count one; whether the limit is reached."""
        self.seen += 1
        return self.reached

    @property
    def reached(self) -> bool:
        """Whether --count is reached (never without --count)."""
        return self.limit is not None and self.seen >= self.limit


async def within_timeout(options: TailOptions, counter: Counter, tail: Awaitable[None]) -> None:
    """Run `tail` for at most --timeout seconds; a timeout before --count is reached is an
    error."""
    if options.timeout is None:
        await tail
        return
    try:
        async with asyncio.timeout(options.timeout) as deadline:
            await tail
    except TimeoutError:
        if not deadline.expired():
            raise  # a timeout of the client's own
        if counter.limit is not None and not counter.reached:
            raise click.ClickException(
                f"timed out after {options.timeout:g} s: {counter.seen} of {counter.limit} seen"
            ) from None


def echo(line: str) -> None:
    """One output line, flushed at once (a script reads the lines as they come)."""
    click.echo(line)
    sys.stdout.flush()


# --- watch ------------------------------------------------------------------------------------


@click.command(short_help="A live tail of a kind's changes.")
@connection_options
@click.argument("kind")
@click.option(
    "--bootstrap",
    is_flag=True,
    help="First print every existing entity, then a 'bootstrap complete' line.",
)
@click.option("--include-previous", is_flag=True, help="Show the values before each update too.")
@count_option("Exit after N live changes (0: right after subscribing, or after the bootstrap).")
@timeout_option
def watch(
    host: str,
    port: int,
    token: str,
    as_json: bool,
    kind: str,
    bootstrap: bool,
    include_previous: bool,
    count: int | None,
    timeout: float | None,
) -> None:
    """Follow the changes of KIND live, one line per change (--json: one object per line).

    Each line has the change (CREATED, UPDATED, DELETED, or BOOTSTRAP for the entities
    --bootstrap sends), the entity id, its version and sources, and the values: every field
    for a new entity, the changed fields for an update, the cause for a deletion. --count
    counts live changes (not the entities of the bootstrap).
    """
    options = TailOptions(host, port, token, as_json, count, timeout)
    run_tail(_watch(options, kind, bootstrap=bootstrap, include_previous=include_previous))


async def _watch(
    options: TailOptions, kind: str, *, bootstrap: bool, include_previous: bool
) -> None:
    counter = Counter(options.count)
    async with reader_for(options) as client:
        handle = await resolve(client, kind)
        subscription = handle.subscribe(bootstrap=bootstrap, include_previous=include_previous)
        async with subscription:
            printer = ChangePrinter(handle, options.as_json)
            printer.subscribed(subscription.accepted_seq)
            if options.count == 0 and not bootstrap:
                return

            async def follow() -> None:
                async for item in subscription:
                    printer.item(item)
                    if _ends_tail(item, counter, options.count):
                        return

            await within_timeout(options, counter, follow())


def _ends_tail(item: SubscriptionItem[Record], counter: Counter, count: int | None) -> bool:
    """Whether the tail is done after `item`: --count live changes seen, or --count 0 and
    the bootstrap complete."""
    if isinstance(item, Change) and item.type is not ChangeType.BOOTSTRAP:
        return counter.add()
    return isinstance(item, BootstrapComplete) and count == 0


class ChangePrinter:
    """Prints the items of a state subscription, for people or as JSON lines."""

    def __init__(self, handle: DynamicKindHandle, as_json: bool) -> None:
        self.handle = handle
        self.as_json = as_json

    def subscribed(self, seq: int) -> None:
        """The first line: the server accepted the subscription at `seq`."""
        if self.as_json:
            echo(to_json({"type": "SUBSCRIBED", **self._kind(), "seq": seq}))
        else:
            echo(
                f"watching {self.handle.name} (kind {self.handle.kind_id}) from seq {seq}; "
                "Ctrl-C to stop"
            )

    def item(self, item: SubscriptionItem[Record]) -> None:
        """One item of the subscription."""
        if isinstance(item, Change):
            echo(to_json(self._change_json(item)) if self.as_json else self._change_text(item))
        elif isinstance(item, BootstrapStarted):
            self._marker("BOOTSTRAP_BEGIN", item.mode.name, item.count, "bootstrap: {n}")
        elif isinstance(item, BootstrapComplete):
            self._marker(
                "BOOTSTRAP_COMPLETE", item.mode.name, item.count, "bootstrap complete: {n}"
            )
        elif isinstance(item, Resubscribed):
            if self.as_json:
                echo(to_json({"type": "RESUBSCRIBED", "mode": item.mode.name}))
            else:
                echo(f"reconnected; subscription resumed ({item.mode.name})")

    def _kind(self) -> dict[str, Any]:
        return {"kind": self.handle.name, "kind_id": self.handle.kind_id}

    def _marker(self, kind: str, mode: str, count: int, text: str) -> None:
        if self.as_json:
            echo(to_json({"type": kind, "mode": mode, "count": count}))
        else:
            echo(text.format(n=plural(count, "entity")))

    def _change_json(self, change: Change[Record]) -> dict[str, Any]:
        state: dict[str, Any] = {
            "type": change.type.name,
            "kind": self.handle.name,
            "entity_id": change.entity_id.hex(),
            "version": change.version,
            "seq": change.seq,
            "source_set": change.source_set,
            "sources": change.sources,
            "changed_fields": list(change.changed_field_names),
            "value": change.value,
        }
        if change.previous is not None:
            state["previous"] = change.previous
        if change.cause is not None:
            state["cause"] = change.cause.name
        return {**state, **meta_json(change.meta)}

    def _change_text(self, change: Change[Record]) -> str:
        head = f"{change.type.name:<9} {short_id(change.entity_id)}  v{change.version}"
        if change.type is ChangeType.DELETED:
            parts = [head, f"cause {_cause_text(change.cause)}"]
        elif change.type is ChangeType.UPDATED:
            parts = [head, f"sources {change.sources}", f"changed {_updated_values(change)}"]
        else:
            parts = [head, f"sources {change.sources}", values_text(change.value or {})]
        parts += meta_text(change.meta)
        return "  ".join(parts)


def _updated_values(change: Change[Record]) -> str:
    """The changed fields of an update: `hp=75`, or `hp: 9 -> 75` with the previous state."""
    value = change.value or {}
    names = change.changed_field_names
    if change.previous is None:
        return values_text({name: value.get(name) for name in names})
    previous = change.previous
    return " ".join(f"{name}: {previous.get(name)!r} -> {value.get(name)!r}" for name in names)


def _cause_text(cause: DeleteCause | EventCause | None) -> str:
    """Why an entity was deleted (or a retract synthesised), for people: `epoch end`."""
    return "unknown" if cause is None else cause.name.lower().replace("_", " ")


def plural(count: int, noun: str) -> str:
    """`1 entity`, `2 entities`."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


def values_text(values: Record) -> str:
    """Field values for people: `name='ana' hp=9 pos={'x': 1.0, 'y': 2.0}`."""
    return " ".join(f"{name}={value!r}" for name, value in values.items())


def short_id(entity_id: bytes) -> str:
    """An entity id for people. A short id (an int id, short raw bytes) as hex without its
    trailing zero bytes, which `convergedb get KIND 0x...` reads back: `0x2a` for the int id
    42. A long one (a hashed string key, a UUID) as its first 6 bytes: `a2a83d863a93...`
    (--json has every id in full)."""
    trimmed = entity_id.rstrip(b"\x00") or b"\x00"
    if len(trimmed) <= SHORT_ID_BYTES:
        return "0x" + trimmed.hex()
    return entity_id[:6].hex() + "..."


def meta_json(meta: bytes) -> dict[str, Any]:
    """The metadata of a write, as JSON: its hex, and its key/value pairs when it has them."""
    if not meta:
        return {}
    state: dict[str, Any] = {"meta": meta.hex()}
    if is_metadata(meta):
        state["metadata"] = decode_metadata(meta)
    return state


def meta_text(meta: bytes) -> list[str]:
    """The metadata of a write, for people (nothing when there is none)."""
    if not meta:
        return []
    if is_metadata(meta):
        return [f"meta {decode_metadata(meta)}"]
    return [f"meta 0x{meta.hex()}"]


# --- events -----------------------------------------------------------------------------------


@click.command(short_help="Follow the event stream of a kind.")
@connection_options
@click.argument("kind")
@click.option(
    "--from",
    "from_seq",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="The first event to show, if the server still keeps it (0: only new events).",
)
@count_option("Exit after N events (0: right after subscribing).")
@timeout_option
def events(
    host: str,
    port: int,
    token: str,
    as_json: bool,
    kind: str,
    from_seq: int,
    count: int | None,
    timeout: float | None,
) -> None:
    """Follow the event stream of KIND (a kind registered with event_stream): every ASSERT,
    PATCH and RETRACT received, before coalescing, one line each (--json: one object per line).
    """
    options = TailOptions(host, port, token, as_json, count, timeout)
    run_tail(_events(options, kind, from_seq))


async def _events(options: TailOptions, kind: str, from_seq: int) -> None:
    counter = Counter(options.count)
    async with reader_for(options) as client:
        handle = await resolve(client, kind)
        if not handle.server_definition.event_stream:
            raise click.ClickException(
                f"kind {kind!r} keeps no event stream (it was registered without event_stream)"
            )
        subscription = handle.subscribe_events(from_seq)
        async with subscription:
            printer = EventPrinter(handle, options.as_json)
            # events are numbered contiguously: the first one the server sends is this
            printer.subscribed(subscription.next_seq - subscription.received)
            if options.count == 0:
                return

            async def follow() -> None:
                async for event in subscription:
                    printer.event(event)
                    if counter.add():
                        return

            await within_timeout(options, counter, follow())


class EventPrinter:
    """Prints the events of an event subscription, for people or as JSON lines."""

    def __init__(self, handle: DynamicKindHandle, as_json: bool) -> None:
        self.handle = handle
        self.as_json = as_json

    def subscribed(self, next_seq: int) -> None:
        """The first line: the server accepted the subscription; `next_seq` comes first."""
        if self.as_json:
            echo(
                to_json(
                    {
                        "type": "SUBSCRIBED",
                        "kind": self.handle.name,
                        "kind_id": self.handle.kind_id,
                        "next_seq": next_seq,
                    }
                )
            )
        else:
            echo(
                f"events of {self.handle.name} (kind {self.handle.kind_id}) from #{next_seq}; "
                "Ctrl-C to stop"
            )

    def event(self, event: EventItem[Record]) -> None:
        """One event."""
        echo(to_json(self._json(event)) if self.as_json else self._text(event))

    def _json(self, event: EventItem[Record]) -> dict[str, Any]:
        state = {
            "type": "EVENT",
            "kind": self.handle.name,
            "seq": event.seq,
            "source_id": event.source_id,
            "op": event.op.name,
            "cause": event.cause.name,
            "entity_id": event.entity_id.hex(),
            "data": event.data,
        }
        return {**state, **meta_json(event.meta)}

    def _text(self, event: EventItem[Record]) -> str:
        parts = [
            f"#{event.seq}",
            f"source {event.source_id}",
            f"{event.op.name:<7}",
            short_id(event.entity_id),
        ]
        if event.cause is not EventCause.CLIENT_WRITE:
            parts.append(f"({_cause_text(event.cause)})")
        if event.op is not EventOp.RETRACT and isinstance(event.data, dict):
            parts.append(values_text(event.data))
        parts += meta_text(event.meta)
        return "  ".join(parts)
