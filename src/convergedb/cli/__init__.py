"""The `convergedb` command-line tool."""

from __future__ import annotations

import click

from .. import __version__
from .backup import backup
from .demo import demo
from .inspect import get, kinds, status
from .serve import serve
from .tail import events, watch


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="convergedb")
def main() -> None:
    """ConvergeDB: live, merged entity state from many writers, pushed to subscribers."""


for command in (serve, status, kinds, get, watch, events, demo, backup):
    main.add_command(command)
