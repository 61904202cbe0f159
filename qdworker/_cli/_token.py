"""``token --user N``: mint a websocket token (needs ``QDWORKER_WS_SECRET``)."""

from __future__ import annotations

import argparse

from .._config import Config
from .._events.tokens import mint
from ..errors import ConfigError
from ._command import Command


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", type=int, required=True, help="the user id (userId claim)")
    parser.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)"
    )
    parser.add_argument(
        "--admin", action="store_true", help="an admin token: sees every user's events"
    )
    parser.add_argument(
        "--viewer", action="store_true", help="a viewer token: reads the dashboard, cannot act"
    )


def _token(args: argparse.Namespace, config: Config) -> int:
    if not config.ws_secret:
        raise ConfigError("QDWORKER_WS_SECRET is not set: tokens need a secret to be signed with")
    if args.user < 1 or not args.ttl > 0:
        raise ConfigError("--user must be >= 1 and --ttl > 0")
    if args.admin and args.viewer:
        raise ConfigError("--admin and --viewer exclude each other (an admin also views)")
    print(mint(config.ws_secret, args.user, args.ttl, args.admin, viewer=args.viewer))
    return 0


COMMAND = Command("token", "mint a websocket token for a user", _add_arguments, _token)
