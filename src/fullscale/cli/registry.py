"""The registry of subcommands: each registers its help line, its arguments and run(args) -> exit code."""

from __future__ import annotations

import argparse
import re

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2

COMMANDS: dict[str, tuple] = {}   # name -> (help, run(args) -> exit code, add_arguments(parser))


def command(name: str, help: str, arguments):
    """Register a subcommand: its help line, its arguments (a function adding them to its parser)
    and the decorated run(args) -> exit code."""
    def register(fn):
        COMMANDS[name] = (help, fn, arguments)
        return fn
    return register


_HUB_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


def hub_id(text: str) -> str:
    """An argument type: a Hugging Face repository id, NAME or ORG/NAME (letters, digits, '-', '_',
    '.'; no '..' or '--'; at most 96 characters a part), never a path."""
    parts = text.split("/")
    if len(parts) > 2 or not all(_HUB_PART.match(p) and ".." not in p and "--" not in p for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a Hugging Face repository id: write ORG/NAME (or NAME), each part letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit, no '..' or '--'")
    return text


def positive_int(text: str) -> int:
    """An argument type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
