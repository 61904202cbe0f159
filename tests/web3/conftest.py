"""Web3 test fixtures: one anvil node for the session with the example contracts.

The node is a real anvil (``tests/support/anvil.py``), chain state is driven with web3.py's
sync client from the test process (``tests/support/web3_chain.py``), and the job types run in
real worker processes (``python -m qdworker._worker``) loading ``qdworker.web3`` plus the
example and test filters.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("web3")
pytest.importorskip("trio_asyncio")

from anvil import Anvil
from web3_chain import Chain, connect_chain


@pytest.fixture(scope="session")
def chain() -> Iterator[Chain]:
    """A shared anvil with the example TokenFactory deployed."""
    node = Anvil()
    node.start()
    try:
        yield connect_chain(node)
    finally:
        node.close()
