-- The supervisor: crash recovery of a worker process's jobs, and `qdworker status`.

-- name: release_worker_leases
-- A worker process ended without a clean shutdown: end the leases of its unfinished jobs now,
-- so they are claimable at once (the claimer counts the run as lost) instead of at lease expiry.
UPDATE worker_jobs
   SET lease_expires_at = now(), updated_at = now()
 WHERE started IS NOT NULL AND finished IS NULL AND lease_owner = %(worker_id)s

-- name: job_status_counts
-- Jobs by status for `qdworker status`: running (live lease), due (claimable now), scheduled
-- (due later), succeeded, cancelled, failed.
SELECT status, count(*) AS jobs
  FROM (SELECT CASE
                 WHEN finished IS NOT NULL AND success THEN 'succeeded'
                 WHEN finished IS NOT NULL AND cancel_requested_at IS NOT NULL THEN 'cancelled'
                 WHEN finished IS NOT NULL THEN 'failed'
                 WHEN lease_owner IS NOT NULL AND lease_expires_at > now() THEN 'running'
                 WHEN due <= now() THEN 'due'
                 ELSE 'scheduled'
               END AS status
          FROM worker_jobs) AS s
 GROUP BY status
 ORDER BY array_position(
            ARRAY['running', 'due', 'scheduled', 'succeeded', 'cancelled', 'failed'], status)
