"""`convergedb backup`: a consistent copy of a data directory, safe while the server runs."""

from __future__ import annotations

from pathlib import Path

import click

from .. import limits
from ..server.storage import Store, StoreError


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=limits.DEFAULT_DATA_DIR,
    envvar="CONVERGEDB_DATA_DIR",
    show_default=True,
    help="The data directory to copy (a server may be running on it).",
)
@click.argument("destination", type=click.Path(file_okay=False, path_type=Path))
def backup(data_dir: Path, destination: Path) -> None:
    """Copy the store into DESTINATION (a new directory), as of a committed flush.

    Start a server with `--data-dir DESTINATION` to restore it.
    """
    try:
        Store.backup(data_dir, destination)
    except (StoreError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"backed up {data_dir} to {destination}")
