"""`facegen` command line: dispatches to the sub-command modules in `jobs/commands/`."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import signal
import sys
import threading

from facegen.models.errors import JobFailed, UserError

# Sub-command modules, in the order `facegen --help` lists them. Every one must import: a broken or
# missing module is an installation error, never a silently absent command.
COMMAND_MODULES = [
    "quickstart",
    "generate",
    "index",
    "audit",
    "features",
    "train",
    "train_fr",
    "eval_fr",
    "eval_data",
    "export",
    "submit",
    "models",
    "convert",
    "bench",
    "disentangle",
    "anonymize",
    "world",
    "preview",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facegen",
        description=(
            "Privacy-certified synthetic VIS+NIR face-recognition datasets, "
            "from a laptop to a Ray cluster."
        ),
    )
    register_modules(parser.add_subparsers(dest="command", metavar="COMMAND"), "facegen.jobs.commands", COMMAND_MODULES)
    return parser


def register_modules(subparsers: argparse._SubParsersAction, package: str, names: list[str]) -> None:
    """Let each `package.name` module add its parsers."""
    for name in names:
        importlib.import_module(f"{package}.{name}").register(subparsers)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    previous = _stop_on_sigterm()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("facegen: interrupted", file=sys.stderr)
        return 130
    except SystemExit as stop:  # a Ray driver turns SIGTERM into sys.exit(SIGTERM)
        if stop.code != signal.SIGTERM:
            raise
        print("facegen: interrupted", file=sys.stderr)
        return 130
    except UserError as err:
        print(f"facegen: error: {err}", file=sys.stderr)
        return 2
    except JobFailed as err:
        print(f"facegen: failed: {err}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The `facegen` command: `main()`, then exit with its code.

    When `main()` returns, the command has finished: its `finally` blocks ran and its files are
    closed. The process then takes the steps of Python's own shutdown that can still matter (wait for
    non-daemon threads, run the exit hooks: Ray stops a cluster this driver started) and leaves with
    `os._exit`, skipping native libraries' exit-time destructors. Those abort now and then after the
    work is done: Arrow's thread pool after a threaded parquet read, for one, ends about one
    `index query` in three and one interrupted run in ten with "terminate called without an active
    exception" and exit -6 instead of the command's code."""
    code = main()
    threading._shutdown()  # what the interpreter does first on exit: join non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # a reader that went away (`| head`), a closed stream
            pass
    os._exit(code)


def _stop_on_sigterm():
    """SIGTERM (`kill`, `facegen stop`, a scheduler's stop) stops a command as Ctrl-C does: cleanly, with a
    one-line message and exit 130. Only the main thread can install handlers; elsewhere nothing changes."""
    try:
        return signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:
        return None


if __name__ == "__main__":
    run()
