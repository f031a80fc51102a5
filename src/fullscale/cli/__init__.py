"""The command line: one registry of subcommands (registry.py), each an add_parser() and a
run(args) -> exit code; the commands that train in training.py, those about a run in runs.py.

Bad input (config, data, model files, checkpoints) is one short paragraph on stderr and exit
code 2, never a traceback (`--debug` shows it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from fullscale.cli import runs, training  # noqa: F401 - each module registers its commands
from fullscale.cli.registry import COMMANDS, EXIT_BAD_INPUT, EXIT_OK
from fullscale.errors import UserError

# The order `fullscale --help` lists them in.
ORDER = ("train", "resume", "configs", "prepare", "checkpoints", "status", "report", "export", "generate", "plan")


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fullscale", description="Full-scale LoRA fine-tuning that survives crashes.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(COMMANDS, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        help_text, _, arguments = COMMANDS[name]
        arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and argv is None:
        _leave_process_group(code)
    return code


def _leave_process_group(code: int) -> None:
    """End a process of a multi-process launch without the interpreter's teardown: with the process
    group's threads still around, that teardown can abort ("terminate called without an active
    exception", SIGABRT) after the run's work is done and saved, turning a finished run into a
    failed launch. Everything is flushed first; the group is left cleanly."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_BAD_INPUT
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _quiet_libraries(load_models=args.command not in READS_FILES_ONLY)
    _, run, _ = COMMANDS[args.command]
    from fullscale.preemption import EXIT_PREEMPTED, StartupInterrupted

    try:
        return run(args)
    except StartupInterrupted as exc:
        print(f"fullscale: {exc}", file=sys.stderr)
        return EXIT_PREEMPTED
    except UserError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fullscale: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fullscale: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


# Commands that only read a run's files: they never import torch or transformers (status < 1 s).
READS_FILES_ONLY = ("status", "report", "checkpoints", "configs")


def _quiet_libraries(*, load_models: bool = True) -> None:
    import warnings

    # Deprecation notices of renamed library functions are for library authors, not users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if not load_models:
        return
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate and peft when installed) would pick the CPU itself and
        # print a warning about it on every command; the same choice, without the warning.
        os.environ["DS_ACCELERATOR"] = "cpu"
