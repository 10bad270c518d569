"""`python -m convergedb`: the command-line tool."""

from .cli import main

if __name__ == "__main__":  # not when a spawned child process (the checkpointer) imports it
    main()
