-- The worker's path: claim, renew, complete, release. Every write after a claim is fenced by
-- (id, claims): a worker that lost its lease cannot overwrite the row of a rescued job.

-- name: claim
-- Up to %(limit)s due jobs, in due order, skipping rows other workers hold. A started row
-- whose lease expired was lost with its worker: that run counts as an attempt.
WITH picked AS (
    SELECT id, started IS NOT NULL AS lost
      FROM worker_jobs
     WHERE finished IS NULL
       AND due <= now()
       AND (lease_expires_at IS NULL OR lease_expires_at < now())
     ORDER BY due, id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE worker_jobs AS j
   SET started = now(),
       claims = j.claims + 1,
       attempt = j.attempt + picked.lost::int,
       lost_runs = j.lost_runs + picked.lost::int,
       lease_owner = %(owner)s,
       lease_expires_at = now() + %(lease_seconds)s * interval '1 second',
       updated_at = now()
  FROM picked
 WHERE j.id = picked.id
RETURNING j.*, picked.lost

-- name: next_wakeup
-- Seconds until the earliest pending job is due or a running job's lease expires (NULL: none),
-- and the database clock (for cron arithmetic).
SELECT extract(epoch FROM least(
           (SELECT min(due) FROM worker_jobs
             WHERE finished IS NULL AND started IS NULL AND due > now()),
           (SELECT min(lease_expires_at) FROM worker_jobs
             WHERE finished IS NULL AND lease_owner IS NOT NULL AND lease_owner <> %(owner)s)
       ) - now())::float8 AS seconds,
       extract(epoch FROM now())::float8 AS db_epoch

-- name: complete
-- Finish a batch of runs; rows whose fencing token moved on are left alone (not returned).
UPDATE worker_jobs AS j
   SET finished = now(), success = o.success, result = o.result::jsonb,
       lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM unnest(%(ids)s::bigint[], %(claims)s::integer[], %(success)s::boolean[],
              %(results)s::text[]) AS o(id, claims, success, result)
 WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NULL
RETURNING j.id, j.finished

-- name: insert_successors
-- Retry and next-cron-tick rows, copying every user field of the finished row.
INSERT INTO worker_jobs (
    tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
    auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
    timeout_seconds, rescheduled_from_job, attempt)
SELECT p.tag, p.type, p.user_id, p.data,
       coalesce(s.due, now() + s.delay_ms * interval '1 millisecond'),
       p.cron_schedule, p.auto_reschedule_on_failure, p.auto_reschedule_on_failure_delay,
       p.remove_delay, p.persistent, p.max_attempts, p.backoff, p.timeout_seconds, p.id, s.attempt
  FROM jsonb_to_recordset(%(successors)s::jsonb)
       AS s(from_id bigint, due timestamptz, delay_ms double precision, attempt integer)
  JOIN worker_jobs AS p ON p.id = s.from_id
 ORDER BY s.from_id
RETURNING id, rescheduled_from_job, due, attempt

-- name: release
-- Give runs back (shutdown): pending again at once, not after lease expiry; wake the others.
WITH released AS (
    UPDATE worker_jobs AS j
       SET started = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
      FROM unnest(%(ids)s::bigint[], %(claims)s::integer[]) AS r(id, claims)
     WHERE j.id = r.id AND j.claims = r.claims AND j.finished IS NULL
    RETURNING j.id
)
SELECT count(*) AS n, pg_notify('qdworker_jobs', 'release') FROM released

-- name: renew_leases
-- Heartbeat: extend this worker's leases; report runs someone asked to cancel.
UPDATE worker_jobs
   SET lease_expires_at = now() + %(lease_seconds)s * interval '1 second'
 WHERE lease_owner = %(owner)s AND finished IS NULL
RETURNING id, claims, cancel_requested_at IS NOT NULL AS cancel_requested
