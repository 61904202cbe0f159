-- The worker's path: claim, renew, finish, release. Every write after a claim is fenced by
-- (id, claims): a worker that lost its claim cannot overwrite the row of a rescued job.

-- name: server_epoch
-- Seconds since this server started serving qdworker after a restart or failover (NULL: no
-- restart or failover since the database was created), and whether it was a failover.
SELECT serving_seconds, failover FROM qdworker_server_epoch()

-- name: claim
-- Up to %(limit)s jobs of the worker's %(types)s: first runs lost with their worker (started,
-- lease expired: that run counts as an attempt; only when %(rescue)s, see server_epoch), then
-- due pending jobs in due order; rows other workers hold are skipped. Each claimed row gets
-- this worker's lease and claims + 1 (its fencing token). Returns every column, then ``lost``.
WITH lost AS (
    SELECT id, true AS lost
      FROM worker_jobs
     WHERE %(rescue)s
       AND started IS NOT NULL AND finished IS NULL
       AND (lease_expires_at IS NULL OR lease_expires_at < now())
       AND lease_owner IS DISTINCT FROM %(owner)s  -- never our own run (renewal lagged)
       AND type = ANY(%(types)s::text[])
     ORDER BY lease_expires_at NULLS FIRST
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), pending AS (
    SELECT id, false AS lost
      FROM worker_jobs
     WHERE started IS NULL AND finished IS NULL AND due <= now()
       AND type = ANY(%(types)s::text[])
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
RETURNING j.*, picked.lost

-- name: claim_next
-- The claim's fast path while a backlog drains: up to %(limit)s due pending jobs after the
-- last one this worker claimed (%(after_due)s, %(after_id)s) in due order, no rescue. Starting
-- after it keeps each claim from stepping over the index entries of every job claimed before,
-- which vacuum cannot remove while a long transaction pins the xmin horizon. The claimer falls
-- back to ``claim`` when this finds less than a full batch, and at least once a second.
WITH picked AS (
    SELECT id
      FROM worker_jobs
     WHERE started IS NULL AND finished IS NULL AND due <= now()
       AND (due, id) > (%(after_due)s::timestamptz, %(after_id)s::bigint)
       AND type = ANY(%(types)s::text[])
     ORDER BY due, id
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
)
UPDATE worker_jobs AS j
   SET started = now(),
       claims = j.claims + 1,
       lease_owner = %(owner)s,
       lease_expires_at = now() + %(lease_seconds)s * interval '1 second',
       updated_at = now()
  FROM picked
 WHERE j.id = picked.id
RETURNING j.*, false AS lost

-- name: next_wakeup
-- Seconds until the earliest pending job of %(types)s is due or another worker's lease on one
-- expires (NULL: none), and the database clock (for cron arithmetic).
SELECT extract(epoch FROM least(
           (SELECT min(due) FROM worker_jobs
             WHERE started IS NULL AND finished IS NULL AND due > now()
               AND type = ANY(%(types)s::text[])),
           (SELECT min(lease_expires_at) FROM worker_jobs
             WHERE started IS NOT NULL AND finished IS NULL AND lease_expires_at > now()
               AND lease_owner <> %(owner)s AND type = ANY(%(types)s::text[]))
       ) - now())::float8 AS seconds,
       extract(epoch FROM now())::float8 AS db_epoch

-- name: release_orphans
-- After a claim whose outcome is unknown (the connection broke): rows leased to this worker
-- that it does not hold (%(held)s) were claimed by that statement and never started. Give
-- them back as if never claimed (no attempt is counted) and wake the other workers.
WITH released AS (
    UPDATE worker_jobs
       SET started = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
     WHERE lease_owner = %(owner)s AND started IS NOT NULL AND finished IS NULL
       AND id <> ALL(%(held)s::bigint[])
    RETURNING id
)
SELECT count(*) AS n,
       (SELECT count(*) FROM (SELECT pg_notify('qdworker_jobs', 'release')
                                FROM released LIMIT 1) AS wake) AS woken
  FROM released

-- name: finish
-- One statement (so one round trip, atomic under autocommit) for a whole batch of outcomes:
-- finish rows (fenced), insert retry / next-tick successors of the rows actually finished
-- (copying every user field), store the results of runs a handler's transaction already
-- finished (%(committed)s), give back released runs (pending again at once) and wake the
-- other workers if any were released. Rows this run finished already count as done: those a
-- handler's transaction finished, and, when %(again)s (the batch is written again because the
-- answer to the first attempt was lost), any. Rows whose failure is final (%(dead)s: failed,
-- not cancelled, no successor) get dead_at.
-- Returns one row of arrays.
WITH outcome AS (
    -- Arrays as text literals and results as one JSON array: cheap to build in Python.
    SELECT * FROM ROWS FROM (unnest(%(ids)s::bigint[]), unnest(%(claims)s::integer[]),
                             unnest(%(success)s::boolean[]),
                             unnest(%(committed)s::boolean[]), unnest(%(dead)s::boolean[]),
                             jsonb_array_elements(%(results)s::jsonb))
           AS o(id, claims, success, committed, dead, result)
), done AS (
    UPDATE worker_jobs AS j
       SET finished = now(), success = o.success, result = nullif(o.result, 'null'::jsonb),
           lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
           dead_at = CASE WHEN o.dead THEN now() END
      FROM outcome AS o
     WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NULL AND NOT o.committed
    RETURNING j.*
), already AS (
    SELECT j.id, j.finished
      FROM worker_jobs AS j JOIN outcome AS o ON j.id = o.id AND j.claims = o.claims
     WHERE (%(again)s OR o.committed) AND j.finished IS NOT NULL
), committed_result AS (
    UPDATE worker_jobs AS j
       SET result = nullif(o.result, 'null'::jsonb), updated_at = now()
      FROM outcome AS o
     WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NOT NULL AND o.committed
       AND o.result <> 'null'::jsonb
    RETURNING j.id
), successor AS (
    INSERT INTO worker_jobs (
        tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
        timeout_seconds, queue, priority, concurrency_key, rescheduled_from_job, attempt)
    SELECT d.tag, d.type, d.user_id, d.data,
           coalesce(s.due, now() + s.delay_ms * interval '1 millisecond'),
           d.cron_schedule, d.auto_reschedule_on_failure, d.auto_reschedule_on_failure_delay,
           d.remove_delay, d.persistent, d.max_attempts, d.backoff, d.timeout_seconds, d.queue,
           d.priority, d.concurrency_key, d.id, s.attempt
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
       (SELECT array_agg(id) FROM already) AS already_ids,
       (SELECT array_agg(finished) FROM already) AS already_finished,
       (SELECT array_agg(rescheduled_from_job) FROM successor) AS successor_of,
       (SELECT array_agg(id) FROM successor) AS successor_ids,
       (SELECT count(*) FROM committed_result) AS committed_results,
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
-- Finish runs without successors (the stuck-worker watchdog; fence tests): a failure is final,
-- so the row is dead.
UPDATE worker_jobs AS j
   SET finished = now(), success = o.success, result = o.result::jsonb,
       lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
       dead_at = CASE WHEN NOT o.success THEN now() END
  FROM unnest(%(ids)s::bigint[], %(claims)s::integer[], %(success)s::boolean[],
              %(results)s::text[]) AS o(id, claims, success, result)
 WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NULL
RETURNING j.id, j.finished

-- name: heartbeat
-- Every lease/3, from the lease keeper's thread: register this worker (or refresh it), and
-- extend the leases of the runs it holds, fenced by claims (a run someone else rescued is not
-- renewed: it is missing from the answer, and the worker stops it). Reports runs whose
-- cancellation was requested (a safety net for a lost qdworker_cancel notification).
WITH registration AS (
    INSERT INTO qdworker_workers AS w (id, supervisor, host, pid, types, concurrency,
                                       lease_seconds)
    VALUES (%(owner)s, %(supervisor)s, %(host)s, %(pid)s, %(types)s::text[], %(concurrency)s,
            %(lease_seconds)s)
    ON CONFLICT (id) DO UPDATE SET seen_at = now(), stopped_at = NULL
)
UPDATE worker_jobs AS j
   SET lease_expires_at = now() + %(lease_seconds)s * interval '1 second'
  FROM unnest(%(ids)s::bigint[], %(claims)s::integer[]) AS r(id, claims)
 WHERE j.id = r.id AND j.claims = r.claims AND j.lease_owner = %(owner)s
   AND j.started IS NOT NULL AND j.finished IS NULL
RETURNING j.id, j.cancel_requested_at IS NOT NULL AS cancel_requested

-- name: worker_exit
-- A clean exit: give back every run still leased to this worker except %(keep)s (handlers
-- that ignore cancellation: the supervisor releases those once the process is gone), and
-- mark the worker stopped.
WITH released AS (
    UPDATE worker_jobs
       SET started = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
     WHERE lease_owner = %(owner)s AND started IS NOT NULL AND finished IS NULL
       AND id <> ALL(%(keep)s::bigint[])
    RETURNING id
), stopped AS (
    UPDATE qdworker_workers SET stopped_at = now(), seen_at = now() WHERE id = %(owner)s
)
SELECT count(*) AS n,
       (SELECT count(*) FROM (SELECT pg_notify('qdworker_jobs', 'release')
                                FROM released LIMIT 1) AS wake) AS woken
  FROM released
