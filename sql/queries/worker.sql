-- The worker's path: claim, renew, finish, release. Every write after a claim is fenced by
-- (id, claims): a worker that lost its lease cannot overwrite the row of a rescued job.

-- name: claim
-- Returns the columns in qdworker.model.Job's field order, then ``lost`` (tests check it).
-- Up to %(limit)s jobs: first runs lost with their worker (started, lease expired: that run
-- counts as an attempt), then due pending jobs in due order; rows other workers hold are
-- skipped. Each claimed row gets this worker's lease and claims + 1 (its fencing token).
WITH lost AS (
    SELECT id, true AS lost
      FROM worker_jobs
     WHERE started IS NOT NULL AND finished IS NULL
       AND (lease_expires_at IS NULL OR lease_expires_at < now())
       AND lease_owner IS DISTINCT FROM %(owner)s  -- never our own run (renewal lagged)
     ORDER BY lease_expires_at NULLS FIRST
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), pending AS (
    SELECT id, false AS lost
      FROM worker_jobs
     WHERE started IS NULL AND finished IS NULL AND due <= now()
     ORDER BY due, id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), picked AS (
    SELECT * FROM lost
    UNION ALL
    SELECT * FROM pending
     LIMIT %(limit)s
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
RETURNING j.id, j.tag, j.type, j.user_id, j.data, j.due, j.started, j.finished, j.remove_at,
          j.success, j.result, j.cron_schedule, j.auto_reschedule_on_failure,
          j.auto_reschedule_on_failure_delay, j.remove_delay, j.rescheduled_from_job,
          j.persistent, j.created_at, j.updated_at, j.attempt, j.max_attempts, j.backoff,
          j.timeout_seconds, j.claims, j.lost_runs, j.lease_owner, j.lease_expires_at,
          j.cancel_requested_at,
          picked.lost

-- name: next_wakeup
-- Seconds until the earliest pending job is due or a running job's lease expires (NULL: none),
-- and the database clock (for cron arithmetic).
SELECT extract(epoch FROM least(
           (SELECT min(due) FROM worker_jobs
             WHERE started IS NULL AND finished IS NULL AND due > now()),
           (SELECT min(lease_expires_at) FROM worker_jobs
             WHERE started IS NOT NULL AND finished IS NULL AND lease_owner <> %(owner)s)
       ) - now())::float8 AS seconds,
       extract(epoch FROM now())::float8 AS db_epoch

-- name: finish
-- One statement (so one round trip, atomic under autocommit) for a whole batch of outcomes:
-- finish rows (fenced), insert retry / next-tick successors of the rows actually finished
-- (copying every user field), give back released runs (pending again at once) and wake the
-- other workers if any were released. Returns one row of arrays: cheap to read.
WITH outcome AS (
    -- Arrays as text literals and results as one JSON array: cheap to build in Python.
    SELECT * FROM ROWS FROM (unnest(%(ids)s::bigint[]), unnest(%(claims)s::integer[]),
                             unnest(%(success)s::boolean[]),
                             jsonb_array_elements(%(results)s::jsonb))
           AS o(id, claims, success, result)
), done AS (
    UPDATE worker_jobs AS j
       SET finished = now(), success = o.success, result = nullif(o.result, 'null'::jsonb),
           lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
      FROM outcome AS o
     WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NULL
    RETURNING j.*
), successor AS (
    INSERT INTO worker_jobs (
        tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
        timeout_seconds, rescheduled_from_job, attempt)
    SELECT d.tag, d.type, d.user_id, d.data,
           coalesce(s.due, now() + s.delay_ms * interval '1 millisecond'),
           d.cron_schedule, d.auto_reschedule_on_failure, d.auto_reschedule_on_failure_delay,
           d.remove_delay, d.persistent, d.max_attempts, d.backoff, d.timeout_seconds, d.id,
           s.attempt
      FROM jsonb_to_recordset(%(successors)s::jsonb)
           AS s(from_id bigint, due timestamptz, delay_ms double precision, attempt integer)
      JOIN done AS d ON d.id = s.from_id
     ORDER BY s.from_id
    RETURNING id, rescheduled_from_job
), released AS (
    UPDATE worker_jobs AS j
       SET started = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
      FROM unnest(%(release_ids)s::bigint[], %(release_claims)s::integer[]) AS r(id, claims)
     WHERE j.id = r.id AND j.claims = r.claims AND j.finished IS NULL
    RETURNING j.id
)
SELECT (SELECT array_agg(id) FROM done) AS done_ids,
       (SELECT array_agg(finished) FROM done) AS done_finished,
       (SELECT array_agg(rescheduled_from_job) FROM successor) AS successor_of,
       (SELECT array_agg(id) FROM successor) AS successor_ids,
       (SELECT count(*) FROM released) AS released,
       (SELECT count(*) FROM (SELECT pg_notify('qdworker_jobs', 'release')
                                FROM released LIMIT 1) AS wake) AS woken

-- name: release
-- Give runs back (the stuck-worker watchdog): pending again at once; wake the others.
WITH released AS (
    UPDATE worker_jobs AS j
       SET started = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
      FROM unnest(%(ids)s::bigint[], %(claims)s::integer[]) AS r(id, claims)
     WHERE j.id = r.id AND j.claims = r.claims AND j.finished IS NULL
    RETURNING j.id
)
SELECT count(*) AS n, pg_notify('qdworker_jobs', 'release') FROM released

-- name: complete
-- Finish runs without successors (the stuck-worker watchdog; fence tests).
UPDATE worker_jobs AS j
   SET finished = now(), success = o.success, result = o.result::jsonb,
       lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
  FROM unnest(%(ids)s::bigint[], %(claims)s::integer[], %(success)s::boolean[],
              %(results)s::text[]) AS o(id, claims, success, result)
 WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NULL
RETURNING j.id, j.finished

-- name: renew_leases
-- Heartbeat: extend this worker's leases; report runs someone asked to cancel.
UPDATE worker_jobs
   SET lease_expires_at = now() + %(lease_seconds)s * interval '1 second'
 WHERE started IS NOT NULL AND finished IS NULL AND lease_owner = %(owner)s
RETURNING id, claims, cancel_requested_at IS NOT NULL AS cancel_requested
