"""``python -m qdworker.benchmark [ARGS]`` = ``python -m qdworker bench [ARGS]``."""

from __future__ import annotations

import sys

from .. import cli

if __name__ == "__main__":
    sys.exit(cli.main(["bench", *sys.argv[1:]]))
