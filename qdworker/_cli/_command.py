"""What every subcommand shares: the :class:`Command` it is declared as, the argument parser
that fails in one line, the settings flags and the :class:`~qdworker._config.Config` they
build."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, NoReturn

from .. import _config as config_module
from .._config import Config

PROG: Final = "qdworker"


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, argument set-up and handler (which returns the
    exit code; async work inside it uses ``trio.run``)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, Config], int]


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line on stderr, exit 2 (argparse's default also prints the usage)."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # the settings flags only


def fail(message: str, code: int = 1) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def settings_parser() -> ArgumentParser:
    parser = ArgumentParser(add_help=False)
    group = parser.add_argument_group("settings (a flag overrides its environment variable)")
    for setting in config_module.SETTINGS:
        if not setting.flag_allowed:
            continue
        default = setting.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(none)"
        elif isinstance(default, bool):
            default = "true" if default else "false"
        elif default is None:
            default = "(unset)"
        text = f"{setting.help}. Env {setting.env}; {setting.accepted}; default {default}"
        group.add_argument(
            setting.flag,
            dest=setting.field,
            metavar=setting.env,
            default=argparse.SUPPRESS,
            help=text.replace("%", "%%"),
        )
    return parser


def load_config(args: argparse.Namespace) -> Config:
    overrides = {s.field: getattr(args, s.field, None) for s in config_module.SETTINGS}
    return config_module.load(os.environ, overrides)
