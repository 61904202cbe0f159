"""OpenTelemetry tracing (qdworker[otel]): the submitter's context travels with the job, each
run is a span, child of it, and a retry's span links to the attempt before. Jobs run in this
process (InlineWorker: the worker's runner and completer code) with the SDK's in-memory
exporter; and without the package, nothing is traced and nothing breaks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from qdworker import Queue, job
from qdworker.testing import InlineWorker

ROOT = Path(__file__).resolve().parents[2]
_EXPORTER = InMemorySpanExporter()


@job("traceOnce")
async def fail_once(ctx: Any) -> dict[str, Any]:
    """Fails its first attempt; opens a span of its own."""
    with trace.get_tracer("test").start_as_current_span("inside"):
        if ctx.job.attempt == 1:
            raise ValueError("first attempt fails")
    return {"attempt": ctx.job.attempt}


@job("traceNoop")
async def trace_noop(ctx: Any) -> None:
    return None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK set up once for this process; the spans each test ends."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def runs_of(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == "process traceOnce"]


def _hex(span_id: int) -> str:
    return f"{span_id:016x}"


async def test_run_spans_are_children_of_the_submitter_and_a_retry_links_back(
    db_url: str, sql: Any, qdworker_inline: InlineWorker, spans: InMemorySpanExporter
) -> None:
    with trace.get_tracer("test").start_as_current_span("request") as request:
        async with Queue(db_url) as queue:
            submitted = await queue.submit_job(
                type="traceOnce", auto_reschedule_on_failure=True, queue="traced"
            )
    request_context = request.get_span_context()
    stored = submitted.trace_context
    assert stored is not None
    version, trace_id, parent_id, _flags = stored["traceparent"].split("-")
    assert (version, trace_id) == ("00", f"{request_context.trace_id:032x}")
    assert parent_id == _hex(request_context.span_id)

    [first_run] = await qdworker_inline.run_due()
    assert not first_run.succeeded
    retry = sql.execute(
        "SELECT id, trace_context FROM worker_jobs WHERE rescheduled_from_job = %s",
        (submitted.id,),
    ).fetchone()
    sql.execute("UPDATE worker_jobs SET due = now() WHERE id = %s", (retry["id"],))
    [second_run] = await qdworker_inline.run_due()
    assert second_run.succeeded

    first, second = runs_of(spans)
    for span, attempt, outcome, job_id in (
        (first, 1, "raised", submitted.id),
        (second, 2, "returned", retry["id"]),
    ):
        assert span.parent is not None
        assert span.context.trace_id == request_context.trace_id
        assert span.parent.span_id == request_context.span_id
        assert span.kind == trace.SpanKind.CONSUMER
        assert dict(span.attributes or {}) == {
            "qdworker.job.id": job_id,
            "qdworker.job.type": "traceOnce",
            "qdworker.job.queue": "traced",
            "qdworker.job.attempt": attempt,
            "qdworker.job.outcome": outcome,
            "messaging.system": "qdworker",
            "messaging.destination.name": "traced",
        }
    assert first.status.status_code == trace.StatusCode.ERROR
    assert not first.links
    [link] = second.links
    assert link.context.span_id == first.context.span_id
    # The row keeps its run's span; the retry's context names it as the previous attempt.
    [row] = sql.execute(
        "SELECT run_traceparent FROM worker_jobs WHERE id = %s", (submitted.id,)
    ).fetchall()
    assert row["run_traceparent"].split("-")[2] == _hex(first.context.span_id)
    assert retry["trace_context"]["previous"] == row["run_traceparent"]
    assert retry["trace_context"]["traceparent"] == stored["traceparent"]
    # The handler's own span is a child of its run's.
    inside = [s for s in spans.get_finished_spans() if s.name == "inside"]
    assert [s.parent.span_id for s in inside if s.parent] == [
        first.context.span_id,
        second.context.span_id,
    ]


async def test_a_job_inserted_by_sql_gets_a_root_span(
    sql: Any, qdworker_inline: InlineWorker, spans: InMemorySpanExporter
) -> None:
    sql.execute("INSERT INTO worker_jobs (type) VALUES ('traceNoop')")
    with trace.get_tracer("test").start_as_current_span("test body"):
        [run] = await qdworker_inline.run_due()  # no ambient span leaks into the run's
    assert run.succeeded
    [span] = [s for s in spans.get_finished_spans() if s.name == "process traceNoop"]
    assert span.parent is None and not span.links
    assert span.attributes is not None and span.attributes["qdworker.job.outcome"] == "returned"


async def test_a_cron_tick_starts_its_own_trace_linked_to_the_tick_before(
    sql: Any, qdworker_inline: InlineWorker, spans: InMemorySpanExporter
) -> None:
    [first] = sql.execute(
        "INSERT INTO worker_jobs (type, cron_schedule, trace_context) VALUES ('traceNoop',"
        " '0 0 * * * *', '{\"traceparent\": \"00-0af7651916cd43dd8448eb211c80319c-"
        "b7ad6b7169203331-01\"}') RETURNING id"
    ).fetchall()
    await qdworker_inline.run_due()
    tick = sql.execute(
        "SELECT id, trace_context FROM worker_jobs WHERE rescheduled_from_job = %s",
        (first["id"],),
    ).fetchone()
    sql.execute("UPDATE worker_jobs SET due = now() WHERE id = %s", (tick["id"],))
    await qdworker_inline.run_due()
    before, after = [s for s in spans.get_finished_spans() if s.name == "process traceNoop"]
    assert before.context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert list(tick["trace_context"]) == ["previous"]  # no parent: a trace of its own
    assert after.parent is None and after.context.trace_id != before.context.trace_id
    [link] = after.links
    assert link.context.span_id == before.context.span_id


async def test_submit_jobs_stores_the_context_and_outside_a_span_none(
    db_url: str, spans: InMemorySpanExporter
) -> None:
    async with Queue(db_url) as queue:
        [outside] = await queue.submit_jobs([{"type": "noop"}])
        with trace.get_tracer("test").start_as_current_span("batch") as batch:
            inside = await queue.submit_jobs([{"type": "noop"}, {"type": "noop"}])
    assert outside.trace_context is None
    span_id = _hex(batch.get_span_context().span_id)
    assert [j.trace_context and j.trace_context["traceparent"].split("-")[2] for j in inside] == [
        span_id,
        span_id,
    ]


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("sys.modules['opentelemetry'] = None", id="not installed"),
        pytest.param("", id="installed, not imported by the application"),
    ],
)
def test_without_opentelemetry_nothing_is_traced_or_imported(setup: str) -> None:
    """A process where the application did not import opentelemetry (or cannot): tracing is
    off, and qdworker's worker and client import nothing of it."""
    code = (
        f"import sys; {setup}\n"
        "import qdworker._client, qdworker._worker.runner\n"
        "from qdworker import _tracing\n"
        "assert _tracing.current_context() is None\n"
        "assert _tracing.start_run(None) is None\n"
        "assert not any(m.startswith('opentelemetry') for m in sys.modules if sys.modules[m])\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
