-- qdworker 0011: what the dashboard needs to stay fast at millions of rows.
-- Released migrations are never edited: add a new numbered file instead.

-- A job page shows the attempts after a job (retries, redrives, cron ticks: the rows whose
-- rescheduled_from_job is it). Without an index that is a scan of the whole table (270 ms at
-- 1,000,000 rows; 0.7 ms with it). Partial: only the rows that continue a chain are indexed,
-- so inserting a new job costs nothing more; a retry or cron tick adds one small index entry
-- (docs/benchmarks.md, "Dashboard at 1,000,000 rows").
CREATE INDEX worker_jobs_chain_idx ON worker_jobs (rescheduled_from_job)
 WHERE rescheduled_from_job IS NOT NULL;
