"""logs.setup: QuickDapp levels, text and JSON lines, worker/job context, no passwords."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from qdworker import _logs as logs


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_lines_carry_context_and_hide_passwords(restore_root: None) -> None:
    out = io.StringIO()
    logs.setup("trace", "text", worker_id="host:1:w0.1", stream=out)
    log = logging.getLogger("qdworker.test")
    logs.trace(log, "tracing")
    log.warning("connect to postgresql://app:hunter2@db/x", extra={"job_id": 42, "job_type": "e"})
    lines = out.getvalue().splitlines()
    assert " trace qdworker.test [w=host:1:w0.1] tracing" in lines[0]
    assert " warn  qdworker.test [w=host:1:w0.1 job=42 type=e] connect to " in lines[1]
    assert "hunter2" not in out.getvalue() and "postgresql://app:***@db/x" in lines[1]


def test_json_lines_and_level_filter(restore_root: None) -> None:
    out = io.StringIO()
    logs.setup("info", "json", stream=out)
    log = logging.getLogger("qdworker.test")
    log.debug("hidden")
    log.error("failed", extra={"job_id": 7, "attempt": 2})
    (line,) = out.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "error" and entry["msg"] == "failed" and entry["job_id"] == 7
    assert entry["attempt"] == 2 and "worker_id" not in entry and entry["ts"].endswith("Z")


def test_setup_twice_replaces_its_own_handler(restore_root: None) -> None:
    before = len(logging.getLogger().handlers)
    logs.setup("info", "text", stream=io.StringIO())
    logs.setup("debug", "json", stream=io.StringIO())
    assert len(logging.getLogger().handlers) == before + 1
    with pytest.raises(ValueError, match="unknown log level"):
        logs.setup("loud", "text")
