"""OpenTelemetry tracing, when the ``qdworker[otel]`` extra is installed: the one place that
imports it.

* :func:`current_context` is what ``submit_job`` / ``submit_jobs`` store in a job's
  ``trace_context``: the W3C ``traceparent`` / ``tracestate`` of the caller's current span.
* :func:`start_run` opens the span of one run, a child of that context (a root span for a job
  without one: inserted by plain SQL, or outside any trace), linked to the span of the attempt
  before (the ``previous`` entry the completer puts in a retry's or cron tick's context). Its
  attributes: ``qdworker.job.id``, ``.type``, ``.queue``, ``.attempt`` and, at the end,
  ``qdworker.job.outcome`` (the ``run_outcome`` column); also ``messaging.system`` and
  ``messaging.destination.name`` (the queue).

Costs: nothing is imported until the application has imported ``opentelemetry.trace`` (before
that no span can be current and no provider set, so every function returns ``None`` after one
dictionary lookup); without the package, likewise. Once it is imported, while no SDK tracer
provider is set (the API's default provider), a run costs one more check. qdworker never sets
a provider or an exporter: the application does (in its job module, or a start-up hook, for
workers). Nothing here raises on a malformed stored context: it is ignored (the span becomes
a root).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from ._logs import module_logger
from ._model import Job

logger = module_logger(__name__)

#: The parts of the OpenTelemetry API used here, once loaded (see :func:`_api`).
trace: Any = None
_PROPAGATOR: Any = None
_Context: Any = None
_OFF_PROVIDERS: tuple[type, ...] = ()


def _api() -> bool:
    """Is the OpenTelemetry API usable (loaded here once, after the application imported
    ``opentelemetry.trace``)?"""
    global trace, _PROPAGATOR, _Context, _OFF_PROVIDERS
    if trace is not None:
        return True
    if sys.modules.get("opentelemetry.trace") is None:
        return False
    try:
        from opentelemetry import context as otel_context
        from opentelemetry import trace as otel_trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:  # a broken installation: tracing stays off
        logger.warning("opentelemetry.trace is imported but unusable: tracing is off")
        return False
    _PROPAGATOR = TraceContextTextMapPropagator()
    _Context = otel_context.Context
    _OFF_PROVIDERS = (otel_trace.ProxyTracerProvider, otel_trace.NoOpTracerProvider)
    trace = otel_trace
    return True


#: Outcomes (``run_outcome``) whose span gets the error status.
ERROR_OUTCOMES: Final = frozenset({"raised", "timed_out", "lost"})
#: The instrumentation scope's name.
TRACER_NAME: Final = "qdworker"

_tracer_of: tuple[Any, Any] | None = None  # (provider, its tracer), made once per provider


def _tracer() -> Any:
    """The tracer of the configured SDK provider, or None (off)."""
    global _tracer_of
    if not _api():
        return None
    provider = trace.get_tracer_provider()
    if isinstance(provider, _OFF_PROVIDERS):
        return None
    if _tracer_of is None or _tracer_of[0] is not provider:
        _tracer_of = (provider, provider.get_tracer(TRACER_NAME))
    return _tracer_of[1]


def current_context() -> dict[str, str] | None:
    """The current span's context as ``trace_context`` stores it (``traceparent``,
    ``tracestate``), or None: tracing off, or no span is current."""
    if not _api():
        return None
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier


def _extract(carrier: Mapping[str, Any] | None) -> Any:
    """The context of ``carrier``'s traceparent (an empty context if it has none)."""
    entries = {k: v for k, v in (carrier or {}).items() if isinstance(v, str)}
    return _PROPAGATOR.extract(entries, context=_Context())


def _link_to_previous(carrier: Mapping[str, Any] | None) -> list[Any]:
    previous = (carrier or {}).get("previous")
    if not isinstance(previous, str):
        return []
    span_context = trace.get_current_span(_extract({"traceparent": previous})).get_span_context()
    return [trace.Link(span_context)] if span_context.is_valid else []


class RunSpan:
    """The span of one run (see the module docstring); :meth:`end` it exactly once."""

    def __init__(self, span: Any) -> None:
        self._span = span

    @property
    def traceparent(self) -> str:
        """The span's W3C traceparent, stored in ``run_traceparent`` (what a retry links to)."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier.get("traceparent", "")

    @contextmanager
    def current(self) -> Iterator[None]:
        """The span is the current one inside (the handler's spans and jobs become its
        children); not ended on exit."""
        with trace.use_span(self._span, end_on_exit=False):
            yield

    def end(self, outcome: str | None) -> None:
        """Set ``qdworker.job.outcome`` (None: the run did not end, e.g. the worker is
        stopping) and end the span."""
        if outcome is not None:
            self._span.set_attribute("qdworker.job.outcome", outcome)
            if outcome in ERROR_OUTCOMES:
                self._span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        self._span.end()


def start_run(job: Job) -> RunSpan | None:
    """Open the span of a run of ``job`` (None: tracing is off)."""
    if trace is None and sys.modules.get("opentelemetry.trace") is None:
        return None  # the common case, at the cost of one lookup
    tracer = _tracer()
    if tracer is None:
        return None
    carrier = job.trace_context if isinstance(job.trace_context, dict) else None
    span = tracer.start_span(
        f"process {job.type}",
        context=_extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        links=_link_to_previous(carrier),
        attributes={
            "qdworker.job.id": job.id,
            "qdworker.job.type": job.type,
            "qdworker.job.queue": job.queue,
            "qdworker.job.attempt": job.attempt,
            "messaging.system": "qdworker",
            "messaging.destination.name": job.queue,
        },
    )
    return RunSpan(span)
