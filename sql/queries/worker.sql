-- The worker's path: claim, renew, finish, release. Every write after a claim is fenced by
-- (id, claims): a worker that lost its claim cannot overwrite the row of a rescued job.

-- name: server_epoch
-- Seconds since this server started serving qdworker after a restart or failover (NULL: no
-- restart or failover since the database was created), and whether it was a failover.
SELECT serving_seconds, failover FROM qdworker_server_epoch()

-- name: claim
-- Up to %(limit)s jobs of the worker's %(types)s from the queues it serves (%(queues)s; NULL:
-- all) that have no limits and are not paused (worker_queues; the limited ones are claimed by
-- qdworker_claim_limited): first runs lost with their worker (started, lease expired: that
-- run counts as an attempt; only when %(rescue)s, see server_epoch), then due pending jobs in
-- run order (qdworker_run_order: priority, aged by waiting), over all queues; rows other
-- workers hold are skipped. While a backlog drains, each queue's scan starts after the last
-- job this worker claimed from it (%(cursor_queues)s, %(cursor_orders)s, %(cursor_ids)s, empty
-- for a full claim): that keeps each claim from stepping over the index entries of every job
-- claimed before, which vacuum cannot remove while a long transaction pins the xmin horizon.
-- The queues with pending jobs are found by a loose index scan (one probe per queue). Each
-- claimed row gets this worker's lease and claims + 1 (its fencing token). Returns every
-- column, then ``lost`` and ``run_order``.
WITH RECURSIVE queues(name) AS (
    (SELECT queue FROM worker_jobs
      WHERE started IS NULL AND finished IS NULL
      ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM worker_jobs AS j
             WHERE j.started IS NULL AND j.finished IS NULL AND j.queue > q.name
             ORDER BY j.queue LIMIT 1)
      FROM queues AS q
     WHERE q.name IS NOT NULL
), open AS (
    SELECT q.name, coalesce(c.after_order, '-infinity') AS after_order,
           coalesce(c.after_id, 0) AS after_id
      FROM queues AS q
      LEFT JOIN unnest(%(cursor_queues)s::text[], %(cursor_orders)s::timestamp[],
                       %(cursor_ids)s::bigint[]) AS c(queue, after_order, after_id)
             ON c.queue = q.name
     WHERE q.name IS NOT NULL
       AND (%(queues)s::text[] IS NULL OR q.name = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM worker_queues AS w
                        WHERE w.name = q.name AND (w.paused OR qdworker_queue_is_limited(w)))
), lost AS (
    SELECT j.id, true AS lost, NULL::timestamp AS run_order
      FROM worker_jobs AS j
     WHERE %(rescue)s
       AND j.started IS NOT NULL AND j.finished IS NULL
       AND (j.lease_expires_at IS NULL OR j.lease_expires_at < now())
       AND j.lease_owner IS DISTINCT FROM %(owner)s  -- never our own run (renewal lagged)
       AND j.type = ANY(%(types)s::text[])
       AND (%(queues)s::text[] IS NULL OR j.queue = ANY(%(queues)s::text[]))
       AND NOT EXISTS (SELECT 1 FROM worker_queues AS w
                        WHERE w.name = j.queue AND (w.paused OR qdworker_queue_is_limited(w)))
     ORDER BY j.lease_expires_at NULLS FIRST
     LIMIT %(limit)s
       FOR UPDATE OF j SKIP LOCKED
), pending AS (
    SELECT p.id, false AS lost, p.run_order
      FROM open AS o
     CROSS JOIN LATERAL (
        SELECT j.id, qdworker_run_order(j.due, j.priority) AS run_order
          FROM worker_jobs AS j
         WHERE j.queue = o.name AND j.started IS NULL AND j.finished IS NULL
           AND (qdworker_run_order(j.due, j.priority), j.id) > (o.after_order, o.after_id)
           AND j.due <= now() AND j.type = ANY(%(types)s::text[])
           -- Jobs waiting on parents (due 9999-01-01, 0012) end the scan: an index bound.
           AND qdworker_run_order(j.due, j.priority) < '9000-01-01'::timestamp
         ORDER BY qdworker_run_order(j.due, j.priority), j.id
         LIMIT %(limit)s
           FOR UPDATE SKIP LOCKED) AS p
     ORDER BY p.run_order, p.id
     LIMIT %(limit)s
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
       updated_at = now(),
       -- A rescued run records the one lost (0009_runs.sql): the supervisor that saw its
       -- worker die wrote how (release_worker_leases: lease_expires_at = updated_at);
       -- otherwise the lease expired and nothing is known of that run.
       run_outcome = CASE WHEN picked.lost THEN 'lost' ELSE j.run_outcome END,
       lost_signal = CASE WHEN NOT picked.lost OR (j.run_outcome = 'lost'
                                                    AND j.lease_expires_at = j.updated_at)
                          THEN j.lost_signal END,
       run_wall_ms = CASE WHEN NOT picked.lost OR (j.run_outcome = 'lost'
                                                    AND j.lease_expires_at = j.updated_at)
                          THEN j.run_wall_ms END,
       run_cpu_ms = CASE WHEN picked.lost THEN NULL ELSE j.run_cpu_ms END,
       run_cpu_shared = CASE WHEN picked.lost THEN NULL ELSE j.run_cpu_shared END,
       run_peak_rss_bytes = CASE WHEN picked.lost THEN NULL ELSE j.run_peak_rss_bytes END,
       run_traceparent = CASE WHEN picked.lost THEN NULL ELSE j.run_traceparent END
  FROM picked
 WHERE j.id = picked.id
RETURNING j.*, picked.lost, picked.run_order

-- name: claim_limited
-- The claim of the limited queues (concurrency, per-key concurrency, rate, fair share) this
-- worker serves, up to %(limit)s jobs: see qdworker_claim_limited in
-- sql/migrations/0005_queues.sql. Returns every column, then ``lost``.
SELECT (c.job).*, c.lost
  FROM qdworker_claim_limited(%(owner)s, %(types)s::text[], %(queues)s::text[], %(limit)s,
                              %(lease_seconds)s, %(rescue)s) AS c

-- name: limited_queues
-- Does this worker serve a limited, unpaused queue (so that its claims call claim_limited)?
SELECT EXISTS (SELECT 1 FROM worker_queues AS w
                WHERE qdworker_queue_is_limited(w) AND NOT w.paused
                  AND (%(queues)s::text[] IS NULL OR w.name = ANY(%(queues)s::text[])))
       AS limited

-- name: next_wakeup
-- Seconds until the earliest pending job of %(types)s in the queues served is due, another
-- worker's lease on one expires, or a rate-limited queue with due work may start a job again
-- (NULL: none), and the database clock (for cron arithmetic).
SELECT extract(epoch FROM least(
           (SELECT min(due) FROM worker_jobs  -- due > created_at: worker_jobs_scheduled_idx
             WHERE started IS NULL AND finished IS NULL AND due > created_at AND due > now()
               AND due < '9000-01-01+00'  -- not the jobs waiting on parents (0012)
               AND type = ANY(%(types)s::text[])
               AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))),
           (SELECT min(lease_expires_at) FROM worker_jobs
             WHERE started IS NOT NULL AND finished IS NULL AND lease_expires_at > now()
               AND lease_owner <> %(owner)s AND type = ANY(%(types)s::text[])),
           (SELECT min(s.starts[cardinality(s.starts) - w.rate_limit + 1]
                       + w.rate_period_ms * interval '1 millisecond')
              FROM worker_queues AS w JOIN qdworker_queue_state AS s ON s.queue = w.name
             WHERE w.rate_limit IS NOT NULL AND NOT w.paused
               AND cardinality(s.starts) >= w.rate_limit
               AND s.starts[cardinality(s.starts) - w.rate_limit + 1]
                   + w.rate_period_ms * interval '1 millisecond' > now()
               AND (%(queues)s::text[] IS NULL OR w.name = ANY(%(queues)s::text[])))
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
-- (copying every user field; the insert trigger never skips a successor), store the results of runs a handler's transaction already
-- finished (%(committed)s), give back released runs (pending again at once) and wake the
-- other workers if any were released. Rows this run finished already count as done: those a
-- handler's transaction finished, and, when %(again)s (the batch is written again because the
-- answer to the first attempt was lost), any. Finishing a job of a limited queue wakes the
-- workers (its slot is free). Rows whose failure is final (%(dead)s: failed, not
-- cancelled, no successor) get dead_at.
-- Returns one row of arrays.
WITH outcome AS (
    -- Arrays as text literals and results as one JSON array: cheap to build in Python.
    -- The run's figures (run_*: NULL outcome when the handler never ran, which keeps the
    -- row's figures as they were) are one array each.
    SELECT * FROM ROWS FROM (unnest(%(ids)s::bigint[]), unnest(%(claims)s::integer[]),
                             unnest(%(success)s::boolean[]),
                             unnest(%(committed)s::boolean[]), unnest(%(dead)s::boolean[]),
                             jsonb_array_elements(%(results)s::jsonb),
                             unnest(%(run_outcome)s::text[]), unnest(%(wall_ms)s::float8[]),
                             unnest(%(cpu_ms)s::float8[]), unnest(%(cpu_shared)s::boolean[]),
                             unnest(%(rss)s::bigint[]), unnest(%(traceparent)s::text[]))
           AS o(id, claims, success, committed, dead, result, run_outcome, wall_ms, cpu_ms,
                cpu_shared, rss, traceparent)
), done AS (
    UPDATE worker_jobs AS j
       SET finished = now(), success = o.success, result = nullif(o.result, 'null'::jsonb),
           lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
           dead_at = CASE WHEN o.dead THEN now() END,
           run_outcome = coalesce(o.run_outcome, j.run_outcome),
           run_wall_ms = CASE WHEN o.run_outcome IS NULL THEN j.run_wall_ms ELSE o.wall_ms END,
           run_cpu_ms = CASE WHEN o.run_outcome IS NULL THEN j.run_cpu_ms ELSE o.cpu_ms END,
           run_cpu_shared = CASE WHEN o.run_outcome IS NULL THEN j.run_cpu_shared
                                 ELSE o.cpu_shared END,
           run_peak_rss_bytes = CASE WHEN o.run_outcome IS NULL THEN j.run_peak_rss_bytes
                                     ELSE o.rss END,
           run_traceparent = CASE WHEN o.run_outcome IS NULL THEN j.run_traceparent
                                  ELSE o.traceparent END
      FROM outcome AS o
     WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NULL AND NOT o.committed
    RETURNING j.*
), already AS (
    SELECT j.id, j.finished
      FROM worker_jobs AS j JOIN outcome AS o ON j.id = o.id AND j.claims = o.claims
     WHERE (%(again)s OR o.committed) AND j.finished IS NOT NULL
), committed_result AS (
    -- The handler's transaction finished the row before the run ended: its result (if it
    -- returned one after the block) and its figures come now.
    UPDATE worker_jobs AS j
       SET result = CASE WHEN o.result <> 'null'::jsonb THEN o.result ELSE j.result END,
           updated_at = now(),
           run_outcome = coalesce(o.run_outcome, j.run_outcome),
           run_wall_ms = coalesce(o.wall_ms, j.run_wall_ms),
           run_cpu_ms = coalesce(o.cpu_ms, j.run_cpu_ms),
           run_cpu_shared = coalesce(o.cpu_shared, j.run_cpu_shared),
           run_peak_rss_bytes = coalesce(o.rss, j.run_peak_rss_bytes),
           run_traceparent = coalesce(o.traceparent, j.run_traceparent)
      FROM outcome AS o
     WHERE j.id = o.id AND j.claims = o.claims AND j.finished IS NOT NULL AND o.committed
       AND (o.result <> 'null'::jsonb OR o.run_outcome IS NOT NULL)
    RETURNING j.id
), successor AS (
    INSERT INTO worker_jobs (
        tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
        timeout_seconds, queue, priority, concurrency_key, on_tag_conflict,
        rescheduled_from_job, attempt, trace_context, depends_on, on_parent_failure,
        has_dependents)
    SELECT d.tag, d.type, d.user_id, d.data,
           coalesce(s.due, now() + s.delay_ms * interval '1 millisecond'),
           d.cron_schedule, d.auto_reschedule_on_failure, d.auto_reschedule_on_failure_delay,
           d.remove_delay, d.persistent, d.max_attempts, d.backoff, d.timeout_seconds, d.queue,
           d.priority, d.concurrency_key, d.on_tag_conflict, d.id, s.attempt,
           -- A retry stays in its submitter's trace; a cron tick starts a trace of its own.
           -- Both link to this run's span ("previous").
           nullif(jsonb_strip_nulls(
                      CASE WHEN s.due IS NULL THEN coalesce(d.trace_context, '{}') - 'previous'
                           ELSE '{}'::jsonb END
                      || jsonb_build_object('previous', d.run_traceparent)), '{}'::jsonb),
           -- A retry continues its chain for the jobs depending on it (0012); a cron tick
           -- after a success starts a new one.
           d.depends_on, d.on_parent_failure, d.has_dependents AND NOT d.success
      FROM jsonb_to_recordset(%(successors)s::jsonb)
           AS s(from_id bigint, due timestamptz, delay_ms double precision, attempt integer)
      JOIN done AS d ON d.id = s.from_id
     ORDER BY s.from_id
    RETURNING id, rescheduled_from_job
), released AS (
    -- Given back (preempted): the run's figures, as JSON (a rare path).
    UPDATE worker_jobs AS j
       SET started = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),
           run_outcome = coalesce(r.run_outcome, j.run_outcome),
           run_wall_ms = CASE WHEN r.run_outcome IS NULL THEN j.run_wall_ms ELSE r.wall_ms END,
           run_cpu_ms = CASE WHEN r.run_outcome IS NULL THEN j.run_cpu_ms ELSE r.cpu_ms END,
           run_cpu_shared = CASE WHEN r.run_outcome IS NULL THEN j.run_cpu_shared
                                 ELSE r.cpu_shared END,
           run_peak_rss_bytes = CASE WHEN r.run_outcome IS NULL THEN j.run_peak_rss_bytes
                                     ELSE r.rss END,
           run_traceparent = CASE WHEN r.run_outcome IS NULL THEN j.run_traceparent
                                  ELSE r.traceparent END
      FROM jsonb_to_recordset(%(released)s::jsonb)
           AS r(id bigint, claims integer, run_outcome text, wall_ms float8, cpu_ms float8,
                cpu_shared boolean, rss bigint, traceparent text)
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
                                FROM released LIMIT 1) AS wake) AS woken,
       -- A slot of a limited queue came free: its waiting jobs may start on any worker.
       (SELECT count(*) FROM (SELECT pg_notify('qdworker_jobs', 'slot')
                                FROM done JOIN worker_queues AS w ON w.name = done.queue
                               WHERE qdworker_queue_is_limited(w) LIMIT 1) AS slot) AS slot

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
-- cancellation was requested (a safety net for a lost qdworker_cancel notification). With
-- the registration go what the worker reports: its slot in its supervisor, how often that
-- slot's process was restarted, its resident memory, the runs it finished and failed.
WITH registration AS (
    INSERT INTO qdworker_workers AS w (id, supervisor, host, pid, types, concurrency,
                                       lease_seconds, slot, restarts, rss_bytes, jobs_run,
                                       jobs_failed)
    VALUES (%(owner)s, %(supervisor)s, %(host)s, %(pid)s, %(types)s::text[], %(concurrency)s,
            %(lease_seconds)s, %(slot)s, %(restarts)s, %(rss_bytes)s, %(jobs_run)s,
            %(jobs_failed)s)
    ON CONFLICT (id) DO UPDATE
        SET seen_at = now(), stopped_at = NULL, rss_bytes = excluded.rss_bytes,
            jobs_run = excluded.jobs_run, jobs_failed = excluded.jobs_failed
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
-- mark the worker stopped with its last counts (%(jobs_run)s, %(jobs_failed)s).
WITH released AS (
    UPDATE worker_jobs
       SET started = NULL, lease_owner = NULL, lease_expires_at = NULL, updated_at = now()
     WHERE lease_owner = %(owner)s AND started IS NOT NULL AND finished IS NULL
       AND id <> ALL(%(keep)s::bigint[])
    RETURNING id
), stopped AS (
    UPDATE qdworker_workers
       SET stopped_at = now(), seen_at = now(), jobs_run = %(jobs_run)s,
           jobs_failed = %(jobs_failed)s
     WHERE id = %(owner)s
)
SELECT count(*) AS n,
       (SELECT count(*) FROM (SELECT pg_notify('qdworker_jobs', 'release')
                                FROM released LIMIT 1) AS wake) AS woken
  FROM released
