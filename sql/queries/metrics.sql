-- Metrics: what supervisors write about their workers' runs (qdworker_throughput), and the
-- cluster figures /metrics and `qdworker status` read. Every read here uses a partial index
-- of unfinished rows or a small table: its cost follows the jobs waiting, not the history.

-- name: add_throughput
-- Add one flush of this supervisor's (%(supervisor)s) counts to its own rows: %(rows)s is a
-- JSON array of {bucket (epoch seconds), queue, type, started, succeeded, failed, run_ms,
-- pickup (histogram counts)}, one per key. Histograms are added entry by entry.
INSERT INTO qdworker_throughput AS t (bucket, supervisor, queue, type, started, succeeded,
                                      failed, run_ms, pickup_ms_hist)
SELECT to_timestamp(r.bucket), %(supervisor)s, r.queue, r.type, r.started, r.succeeded,
       r.failed, r.run_ms, ARRAY(SELECT jsonb_array_elements_text(r.pickup)::bigint)
  FROM jsonb_to_recordset(%(rows)s::jsonb)
       AS r(bucket float8, queue text, type text, started bigint, succeeded bigint,
            failed bigint, run_ms bigint, pickup jsonb)
ON CONFLICT (bucket, supervisor, queue, type) DO UPDATE
   SET started = t.started + excluded.started,
       succeeded = t.succeeded + excluded.succeeded,
       failed = t.failed + excluded.failed,
       run_ms = t.run_ms + excluded.run_ms,
       pickup_ms_hist = ARRAY(SELECT coalesce(u.a, 0) + coalesce(u.b, 0)
                                FROM unnest(t.pickup_ms_hist, excluded.pickup_ms_hist)
                                     WITH ORDINALITY AS u(a, b, i)
                               ORDER BY u.i)

-- name: forget_throughput
-- Delete throughput buckets older than %(older_than_seconds)s seconds.
DELETE FROM qdworker_throughput
 WHERE bucket < now() - %(older_than_seconds)s * interval '1 second'

-- name: queue_figures
-- Per queue: pending jobs due now (due) and due later (scheduled), running jobs (started,
-- unfinished), and the age in seconds of the oldest due pending job (NULL: none). Each half
-- reads its partial index (worker_jobs_queue_pending_idx, worker_jobs_queue_running_idx).
WITH pending AS (
    SELECT queue, count(*) FILTER (WHERE due <= now()) AS due,
           count(*) FILTER (WHERE due > now()) AS scheduled,
           extract(epoch FROM now() - min(due) FILTER (WHERE due <= now()))::float8
               AS oldest_due_seconds
      FROM worker_jobs
     WHERE started IS NULL AND finished IS NULL
     GROUP BY queue
), running AS (
    SELECT queue, count(*) AS running
      FROM worker_jobs
     WHERE started IS NOT NULL AND finished IS NULL
     GROUP BY queue
)
SELECT coalesce(p.queue, r.queue) AS queue, coalesce(p.due, 0) AS due,
       coalesce(p.scheduled, 0) AS scheduled, coalesce(r.running, 0) AS running,
       p.oldest_due_seconds
  FROM pending AS p FULL JOIN running AS r ON r.queue = p.queue
 ORDER BY 1

-- name: enqueued_counts
-- Jobs inserted by queue and type since the schema has counted them (the shards summed).
SELECT queue, type, sum(jobs)::bigint AS jobs
  FROM qdworker_enqueued
 GROUP BY queue, type
 ORDER BY queue, type

-- name: worker_figures
-- Every registered worker (qdworker_workers), alive meaning seen within two leases and not
-- stopped, with its uptime in seconds (since it registered), newest first.
SELECT id, supervisor, host, pid, slot, restarts, rss_bytes, jobs_run, jobs_failed,
       stopped_at IS NULL AND seen_at > now() - 2 * lease_seconds * interval '1 second'
           AS alive,
       extract(epoch FROM coalesce(stopped_at, now()) - started_at)::float8 AS uptime_seconds,
       extract(epoch FROM now() - seen_at)::float8 AS seen_seconds_ago
  FROM qdworker_workers
 ORDER BY started_at DESC
 LIMIT %(limit)s

-- name: cron_figures
-- Each cron schedule's chain (its unfinished row: one per tag and type, from
-- worker_jobs_cron_open_idx) with its lag in seconds: how late its current tick started
-- (running), or how late it is so far (due, not started), or how late the previous tick
-- started (the next one is not due yet: read from the row it was rescheduled from; NULL for a
-- first tick).
SELECT c.type, c.tag, c.cron_schedule, c.due AS next_due, c.started IS NOT NULL AS running,
       CASE
         WHEN c.started IS NOT NULL THEN extract(epoch FROM c.started - c.due)
         WHEN c.due <= now() THEN extract(epoch FROM now() - c.due)
         ELSE (SELECT extract(epoch FROM p.started - p.due)
                 FROM worker_jobs AS p WHERE p.id = c.rescheduled_from_job)
       END::float8 AS lag_seconds
  FROM worker_jobs AS c
 WHERE c.cron_schedule IS NOT NULL AND c.finished IS NULL
 ORDER BY c.type, c.tag
 LIMIT %(limit)s
