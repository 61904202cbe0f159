-- The supervisor: crash recovery of a worker process's jobs, and `qdworker status`.

-- name: release_worker_leases
-- A worker process ended: end the leases of the unfinished jobs it still held now, so they are
-- claimable at once (the claimer counts the run as lost) instead of at lease expiry, and wake
-- the other workers. Records the lost run (0009_runs.sql): its wall time until now and the
-- signal that killed the process (%(signal)s, NULL: it exited). The rescuing claim knows
-- this was written by lease_expires_at = updated_at (both now(); a lease renewed by its worker
-- always ends after the row's last update).
WITH ended AS (
    UPDATE worker_jobs
       SET lease_expires_at = now(), updated_at = now(),
           run_outcome = 'lost', lost_signal = %(signal)s::text,
           run_wall_ms = extract(epoch FROM now() - started) * 1000,
           run_cpu_ms = NULL, run_cpu_shared = NULL, run_peak_rss_bytes = NULL,
           run_traceparent = NULL
     WHERE started IS NOT NULL AND finished IS NULL AND lease_owner = %(worker_id)s
    RETURNING id
)
SELECT count(*) AS n,
       (SELECT count(*) FROM (SELECT pg_notify('qdworker_jobs', 'release')
                                FROM ended LIMIT 1) AS wake) AS woken
  FROM ended

-- name: job_status_counts
-- Jobs by status for `qdworker status`: running (live lease), due (claimable now), scheduled
-- (due later), succeeded, cancelled, failed (and retried or redriven), dead (failed for good).
SELECT status, count(*) AS jobs
  FROM (SELECT CASE
                 WHEN finished IS NOT NULL AND success THEN 'succeeded'
                 WHEN finished IS NOT NULL AND dead_at IS NOT NULL THEN 'dead'
                 WHEN finished IS NOT NULL AND cancel_requested_at IS NOT NULL THEN 'cancelled'
                 WHEN finished IS NOT NULL THEN 'failed'
                 WHEN lease_owner IS NOT NULL AND lease_expires_at > now() THEN 'running'
                 WHEN due <= now() THEN 'due'
                 ELSE 'scheduled'
               END AS status
          FROM worker_jobs) AS s
 GROUP BY status
 ORDER BY array_position(
            ARRAY['running', 'due', 'scheduled', 'succeeded', 'cancelled', 'failed', 'dead'],
            status)

-- name: unknown_types
-- Job types that no live worker runs, when some worker is alive to judge (a stopped fleet
-- fails nothing), with when a worker that runs them was last seen (NULL: never).
WITH live AS (
    SELECT types FROM qdworker_workers
     WHERE stopped_at IS NULL AND seen_at > now() - 2 * lease_seconds * interval '1 second'
)
SELECT t.type,
       (SELECT max(w.seen_at) FROM qdworker_workers AS w WHERE t.type = ANY(w.types)) AS last_seen
  FROM qdworker_job_types AS t
 WHERE EXISTS (SELECT 1 FROM live)
   AND NOT EXISTS (SELECT 1 FROM live WHERE t.type = ANY(live.types))

-- name: fail_unknown_type
-- Fail up to %(batch)s pending jobs of %(type)s that are due and have waited longer than
-- %(limit_seconds)s since they were due or a worker running the type was last seen. Not
-- retried (no worker would run the retry either): they are dead.
WITH doomed AS (
    SELECT id FROM worker_jobs
     WHERE started IS NULL AND finished IS NULL AND type = %(type)s
       AND greatest(due, %(last_seen)s::timestamptz) < now() - %(limit_seconds)s * interval '1 second'
     ORDER BY due
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
)
UPDATE worker_jobs AS j
   SET finished = now(), success = false, updated_at = now(), dead_at = now(),
       result = jsonb_build_object(
           'error', format('no live worker runs job type %%s: it waited more than %%s s; '
                           'add its module to QDWORKER_JOBS', j.type, %(limit_seconds)s),
           'error_type', 'UnknownJobType')
  FROM doomed
 WHERE j.id = doomed.id
RETURNING j.id

-- name: forget_workers
-- Delete worker registrations not seen for %(older_than_seconds)s seconds.
DELETE FROM qdworker_workers
 WHERE seen_at < now() - %(older_than_seconds)s * interval '1 second'
