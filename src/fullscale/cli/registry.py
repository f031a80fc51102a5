"""The registry of subcommands: each registers its help line, its arguments and run(args) -> exit code."""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

COMMANDS: dict[str, tuple] = {}   # name -> (help, run(args) -> exit code, add_arguments(parser))


def command(name: str, help: str, arguments):
    """Register a subcommand: its help line, its arguments (a function adding them to its parser)
    and the decorated run(args) -> exit code."""
    def register(fn):
        COMMANDS[name] = (help, fn, arguments)
        return fn
    return register


def positive_int(text: str) -> int:
    """An argument type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
