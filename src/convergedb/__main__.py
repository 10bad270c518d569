"""`python -m convergedb`: the command-line tool."""

from .cli import main

main()
