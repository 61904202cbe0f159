"""qdworker's optional web3 part: the watchChain and deployMulticall3 job types.

Load it in workers with ``--jobs qdworker.web3`` (or ``QDWORKER_JOBS=qdworker.web3,myapp.filters``);
``pip install 'qdworker[web3]'`` brings web3.py and trio-asyncio. Importing this package *is*
loading it: it validates the web3 settings (:mod:`.config`; a bad or missing value raises
:class:`~qdworker.errors.ConfigError` with one line) and registers the two job types. The
handlers run web3.py's ``AsyncWeb3`` through trio-asyncio (``runtime="asyncio"``).

Apps register chain filters with :func:`chain_filter` (see :mod:`.filters`). What supervisors
ensure at start (the watchChain cron job, deployMulticall3) is declared through the registry,
as any job module's (see :mod:`.startup`).
"""

from __future__ import annotations

from . import _config

_config.current()  # fail now, with one line, if the settings are bad

from . import _multicall3, _watch  # noqa: E402, F401  (registers the job types)
from ._config import Chain, Web3Config, current  # noqa: E402
from ._filters import ChainFilter, ChainLog, chain_filter, registered_filters  # noqa: E402
from ._startup import WATCH_CHAIN  # noqa: E402
from ._tx import ChainTransaction  # noqa: E402

__all__ = [
    "WATCH_CHAIN",
    "Chain",
    "ChainFilter",
    "ChainLog",
    "ChainTransaction",
    "Web3Config",
    "chain_filter",
    "current",
    "registered_filters",
]
