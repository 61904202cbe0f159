"""The supervisor process: worker children, IPC, and the embeddable :func:`serve`.

``manager = await nursery.start(qdworker.supervisor.serve, config)`` runs it inside a trio app;
``python -m qdworker`` runs it standalone (see :mod:`qdworker.cli`).
"""

from __future__ import annotations

from .children import Child, ChildStatistics
from .main import Manager, SupervisorStatistics, serve

__all__ = ["Child", "ChildStatistics", "Manager", "SupervisorStatistics", "serve"]
