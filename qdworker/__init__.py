"""qdworker: a Postgres-backed background job worker for trio and asyncio apps.

Jobs are rows in ``worker_jobs``; ``python -m qdworker`` runs the workers. The public API is
what ``__all__`` lists; every other module is private.
"""

from __future__ import annotations

from .client import Queue
from .config import Config
from .errors import (
    ConfigError,
    DatabaseError,
    EmbeddedDatabaseError,
    InvalidJobError,
    JobTypeError,
    MigrationError,
    QdworkerError,
    TokenError,
)
from .events.tokens import ws_token
from .model import Job
from .registry import job
from .supervisor.main import Manager, serve
from .worker.context import JobContext

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DatabaseError",
    "EmbeddedDatabaseError",
    "InvalidJobError",
    "Job",
    "JobContext",
    "JobTypeError",
    "Manager",
    "MigrationError",
    "QdworkerError",
    "Queue",
    "TokenError",
    "__version__",
    "job",
    "serve",
    "ws_token",
]
