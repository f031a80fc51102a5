"""Errors that mean "the user's input is wrong": the CLI prints them as one paragraph, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, data, model files, checkpoint).

    The message must say what was wrong, where (file, line, key) and how to fix it.
    The CLI prints it without a traceback and exits with code 2.
    """

    exit_code = 2


class ConfigError(UserError):
    """One or more config problems; `problems` holds every one of them."""

    def __init__(self, problems: list[str] | str, *, source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"config error{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{len(self.problems)} config errors{where}:\n{lines}"
        super().__init__(text)


class DataError(UserError):
    """A dataset file cannot be used as given."""


class ModelError(UserError):
    """The base model or tokenizer cannot be loaded or used as given."""


class CheckpointError(UserError):
    """A checkpoint or run directory cannot be used as given."""


class DiskSpaceError(UserError):
    """A checkpoint cannot be written (disk full, read-only, no permission). Not bad input, so exit 1."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type where it says nothing), for one-line messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
