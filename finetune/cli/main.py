"""The `finetune` command. Every user mistake ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import NoReturn

from finetune.cli import model_commands, run_commands
from finetune.errors import Interrupted, UserError
from finetune.evals import commands as eval_commands

EXIT_USAGE = 2
DISTRIBUTION = "finetune-gpt2"  # the name on the package index; `finetune` there is another project
COMMAND_MODULES = (model_commands, run_commands, eval_commands)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{version(DISTRIBUTION)} (distribution {DISTRIBUTION})"
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="finetune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for module in COMMAND_MODULES:
        module.add_commands(commands)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"finetune: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: list[str] | None = None) -> int:
    with warnings.catch_warnings():  # restores the caller's warning handling afterwards
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        listed = next((name for name in ("overrides", "params") if hasattr(args, name)), None)
        if unknown and listed and not any(u.startswith("-") for u in unknown):
            getattr(args, listed).extend(unknown)  # key=value items given after an option; checked with the config
        elif unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # argparse has printed its one line (or --help); return, do not raise
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        args.func(args)
    except Interrupted as e:
        print(f"finetune: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"finetune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0
