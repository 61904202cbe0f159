-- The dashboard's reads and actions (qdworker/_http/_dash_store.py runs them).
--
-- Statements over "the jobs a filter matches" hold the marker /* filters */, which
-- _dash_store.py replaces with the dash_filters block below (static text: nothing here is
-- ever built from user strings). Every filter is a parameter; NULL means "any". The
-- statements are run unprepared, so each is planned with its values and the unused filters
-- fold away.

-- name: dash_filters
    (%(id)s::bigint IS NULL OR id = %(id)s::bigint)
AND (%(state)s::text IS NULL
     OR (%(state)s::text = 'pending' AND started IS NULL AND finished IS NULL)
     OR (%(state)s::text = 'running' AND started IS NOT NULL AND finished IS NULL)
     OR (%(state)s::text = 'unfinished' AND finished IS NULL)
     OR (%(state)s::text = 'succeeded' AND finished IS NOT NULL AND success)
     OR (%(state)s::text = 'failed' AND finished IS NOT NULL AND NOT success)
     OR (%(state)s::text = 'dead' AND dead_at IS NOT NULL)
     OR (%(state)s::text = 'cancelled' AND cancel_requested_at IS NOT NULL))
AND (%(type)s::text IS NULL OR type = %(type)s::text)
AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
AND (%(user_id)s::bigint IS NULL OR user_id = %(user_id)s::bigint)
AND (%(tag)s::text IS NULL OR tag = %(tag)s::text)
AND (%(concurrency_key)s::text IS NULL OR concurrency_key = %(concurrency_key)s::text)
AND (%(error_type)s::text IS NULL OR result->>'error_type' = %(error_type)s::text)
AND (%(error)s::text IS NULL OR left(result->>'error', 500) = %(error)s::text)
AND (%(text)s::text IS NULL
     OR strpos(lower(data::text), lower(%(text)s::text)) > 0
     OR strpos(lower(coalesce(result->>'error', '')), lower(%(text)s::text)) > 0)
AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
AND (%(until)s::timestamptz IS NULL OR created_at < %(until)s::timestamptz)

-- name: dash_jobs
-- One page of the jobs a filter matches, newest first, below the keyset cursor %(before)s
-- (an id; NULL: from the newest). %(limit)s is the page size plus one (is there more?).
-- Summary columns only: the job page shows every column.
SELECT id, type, queue, tag, user_id, priority, concurrency_key, attempt, max_attempts,
       created_at, due, started, finished, success, dead_at, cancel_requested_at,
       CASE WHEN finished IS NULL AND started IS NULL THEN 'pending'
            WHEN finished IS NULL THEN 'running'
            WHEN dead_at IS NOT NULL THEN 'dead'
            WHEN success THEN 'succeeded'
            WHEN cancel_requested_at IS NOT NULL THEN 'cancelled'
            ELSE 'failed' END AS state,
       left(result->>'error', 200) AS error
  FROM worker_jobs
 WHERE id < coalesce(%(before)s::bigint, 9223372036854775807)
   AND /* filters */
 ORDER BY id DESC
 LIMIT %(limit)s

-- name: dash_count
-- How many jobs a filter matches, counting at most %(limit)s (the confirmation of a bulk
-- action: "at least N" past the limit).
SELECT count(*) AS n
  FROM (SELECT 1 FROM worker_jobs WHERE /* filters */ LIMIT %(limit)s) AS matched

-- name: dash_job
SELECT * FROM worker_jobs WHERE id = %(id)s

-- name: dash_chain
-- The attempts of job %(id)s's chain (retries, redrives, cron ticks linked by
-- rescheduled_from_job): up to %(depth)s before it and after it, oldest first.
WITH RECURSIVE up(id, rescheduled_from_job, depth) AS (
    SELECT id, rescheduled_from_job, 0 FROM worker_jobs WHERE id = %(id)s
    UNION ALL
    SELECT j.id, j.rescheduled_from_job, u.depth + 1
      FROM up AS u JOIN worker_jobs AS j ON j.id = u.rescheduled_from_job
     WHERE u.depth < %(depth)s
), down(id, depth) AS (
    SELECT id, 0 FROM worker_jobs WHERE id = %(id)s
    UNION ALL
    SELECT j.id, d.depth + 1
      FROM down AS d JOIN worker_jobs AS j ON j.rescheduled_from_job = d.id
     WHERE d.depth < %(depth)s
)
SELECT j.id, j.type, j.attempt, j.created_at, j.due, j.started, j.finished, j.success,
       j.dead_at, j.rescheduled_from_job, left(j.result->>'error', 200) AS error
  FROM worker_jobs AS j
 WHERE j.id IN (SELECT id FROM up UNION SELECT id FROM down)
 ORDER BY j.id

-- name: dash_cancel
-- Cancel up to %(limit)s unfinished jobs a filter matches (qdworker_cancel_job each).
SELECT id, qdworker_cancel_job(id, %(reason)s) AS outcome
  FROM (SELECT id FROM worker_jobs WHERE finished IS NULL AND /* filters */
         ORDER BY id LIMIT %(limit)s) AS matched

-- name: dash_retry
-- Redrive up to %(limit)s dead jobs a filter matches, oldest first (qdworker_retry_job each;
-- new_id NULL: skipped, see the function).
SELECT id AS old_id, qdworker_retry_job(id) AS new_id
  FROM (SELECT id FROM worker_jobs WHERE dead_at IS NOT NULL AND /* filters */
         ORDER BY id LIMIT %(limit)s) AS matched

-- name: dash_delete
-- Delete up to %(limit)s jobs a filter matches, except running ones (their workers own them:
-- cancel those first). Returns the ids deleted.
DELETE FROM worker_jobs
 WHERE id IN (SELECT id FROM worker_jobs
               WHERE NOT (started IS NOT NULL AND finished IS NULL) AND /* filters */
               ORDER BY id LIMIT %(limit)s)
RETURNING id

-- name: dash_throughput
-- Completed and failed runs per 10-second bucket since %(since)s, summed over the cluster.
SELECT bucket, sum(started)::bigint AS started, sum(succeeded)::bigint AS succeeded,
       sum(failed)::bigint AS failed, sum(run_ms)::bigint AS run_ms
  FROM qdworker_throughput
 WHERE bucket >= %(since)s::timestamptz
 GROUP BY bucket
 ORDER BY bucket

-- name: dash_pickup
-- The pickup-latency histogram since %(since)s, summed over the cluster: one row per entry
-- (1-based, as qdworker._protocol.PICKUP_BOUNDS_MS plus the overflow entry).
SELECT h.entry::integer AS entry, sum(h.n)::bigint AS n
  FROM qdworker_throughput AS t
 CROSS JOIN LATERAL unnest(t.pickup_ms_hist) WITH ORDINALITY AS h(n, entry)
 WHERE t.bucket >= %(since)s::timestamptz
 GROUP BY h.entry
 ORDER BY h.entry

-- name: dash_failures
-- Dead jobs grouped by type, error type and message (its first 500 characters): counts and
-- the last death, the latest first; at most %(limit)s groups.
SELECT type, result->>'error_type' AS error_type, left(result->>'error', 500) AS error,
       count(*) AS jobs, max(dead_at) AS last_dead_at, max(id) AS last_id
  FROM worker_jobs
 WHERE dead_at IS NOT NULL
 GROUP BY 1, 2, 3
 ORDER BY last_dead_at DESC
 LIMIT %(limit)s

-- name: dash_cron
-- Every cron job's next tick (its unfinished row) with the previous tick's outcome, and how
-- late the next tick is (seconds; 0 when not yet due). At most %(limit)s.
SELECT n.id, n.type, n.tag, n.queue, n.cron_schedule, n.due AS next_due, n.started,
       greatest(extract(epoch FROM now() - n.due), 0)::float8 AS lag_seconds,
       p.id AS last_id, p.finished AS last_finished, p.success AS last_success,
       left(p.result->>'error', 200) AS last_error
  FROM (SELECT * FROM worker_jobs  -- pending, then running: each read by its partial index
         WHERE cron_schedule IS NOT NULL AND started IS NULL AND finished IS NULL
        UNION ALL
        SELECT * FROM worker_jobs
         WHERE cron_schedule IS NOT NULL AND started IS NOT NULL AND finished IS NULL) AS n
  LEFT JOIN worker_jobs AS p ON p.id = n.rescheduled_from_job
 ORDER BY n.type, n.tag
 LIMIT %(limit)s

-- name: dash_run_now
-- Make the pending cron tick %(id)s due now and wake the workers. Returns its id, or no row
-- when it is not a pending cron job.
WITH moved AS (
    UPDATE worker_jobs SET due = now(), updated_at = now()
     WHERE id = %(id)s AND cron_schedule IS NOT NULL AND started IS NULL AND finished IS NULL
    RETURNING id
)
SELECT id, pg_notify('qdworker_jobs', 'due') AS notified FROM moved

-- name: dash_supervisors
SELECT id, host, pid, ws_clients, seen_at,
       extract(epoch FROM now() - seen_at)::float8 AS seen_seconds_ago
  FROM qdworker_supervisors
 ORDER BY host, pid

-- name: dash_workers
-- Worker processes seen in the last %(hours)s hours, live ones first.
SELECT id, supervisor, host, pid, slot, types, concurrency, started_at, seen_at, stopped_at,
       restarts, rss_bytes, jobs_run, jobs_failed,
       extract(epoch FROM now() - started_at)::float8 AS uptime_seconds,
       extract(epoch FROM now() - seen_at)::float8 AS seen_seconds_ago
  FROM qdworker_workers
 WHERE seen_at >= now() - %(hours)s * interval '1 hour'
 ORDER BY stopped_at IS NOT NULL, supervisor, slot, started_at DESC
