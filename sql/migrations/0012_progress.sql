-- qdworker 0012: the progress a running handler reports (ctx.progress), the latest value only.
-- Released migrations are never edited: add a new numbered file instead.
--
-- {"fraction": 0..1, "message": text or null, "data": JSON or null, "at": ISO 8601 time of
-- the report}. NULL until the row's handler reports progress. Written by the worker at most
-- every 250 ms per run (the last value of a run is written before its outcome), fenced by the
-- run's claim, so a run that lost the job never overwrites it. A nullable column without a
-- default: adding it rewrites nothing, and rows that never report progress never pay for it.
ALTER TABLE worker_jobs ADD COLUMN progress jsonb;
