-- Queue settings and state (client API, `python -m qdworker queue ...`).

-- name: set_queue
-- Apply %(changes)s (a JSON object holding only the settings to change; null clears a limit)
-- to queue %(name)s's settings row, creating it with the defaults for the rest. One atomic
-- statement: concurrent changes of other settings are not lost. Returns the row.
INSERT INTO worker_queues AS w (name, paused, concurrency, key_concurrency, rate_limit,
                                rate_period_ms, fair, key_weights)
SELECT %(name)s,
       coalesce((c ->> 'paused')::boolean, false),
       (c ->> 'concurrency')::integer,
       (c ->> 'key_concurrency')::integer,
       (c ->> 'rate_limit')::integer,
       coalesce((c ->> 'rate_period_ms')::integer, 1000),
       coalesce((c ->> 'fair')::boolean, false),
       coalesce(c -> 'key_weights', '{}'::jsonb)
  FROM (SELECT %(changes)s::jsonb AS c) AS changes
ON CONFLICT (name) DO UPDATE SET
    paused = CASE WHEN %(changes)s::jsonb ? 'paused' THEN excluded.paused ELSE w.paused END,
    concurrency = CASE WHEN %(changes)s::jsonb ? 'concurrency'
                       THEN excluded.concurrency ELSE w.concurrency END,
    key_concurrency = CASE WHEN %(changes)s::jsonb ? 'key_concurrency'
                           THEN excluded.key_concurrency ELSE w.key_concurrency END,
    rate_limit = CASE WHEN %(changes)s::jsonb ? 'rate_limit'
                      THEN excluded.rate_limit ELSE w.rate_limit END,
    rate_period_ms = CASE WHEN %(changes)s::jsonb ? 'rate_period_ms'
                          THEN excluded.rate_period_ms ELSE w.rate_period_ms END,
    fair = CASE WHEN %(changes)s::jsonb ? 'fair' THEN excluded.fair ELSE w.fair END,
    key_weights = CASE WHEN %(changes)s::jsonb ? 'key_weights'
                       THEN excluded.key_weights ELSE w.key_weights END,
    updated_at = now()
RETURNING *

-- name: reset_queue
-- Forget queue %(name)s's settings (no limits, not paused). Returns how many rows went.
WITH gone AS (DELETE FROM worker_queues WHERE name = %(name)s RETURNING 1)
SELECT count(*) AS n FROM gone

-- name: list_queues
-- Every queue with settings or unfinished jobs: its settings (defaults when it has none),
-- its due and scheduled pending jobs, its running jobs, and how long its oldest due job has
-- waited (seconds). The queues with pending jobs are found by a loose index scan.
WITH RECURSIVE pending_queues(name) AS (
    (SELECT queue FROM worker_jobs
      WHERE started IS NULL AND finished IS NULL
      ORDER BY queue LIMIT 1)
    UNION ALL
    SELECT (SELECT j.queue FROM worker_jobs AS j
             WHERE j.started IS NULL AND j.finished IS NULL AND j.queue > q.name
             ORDER BY j.queue LIMIT 1)
      FROM pending_queues AS q
     WHERE q.name IS NOT NULL
), names AS (
    SELECT name FROM pending_queues WHERE name IS NOT NULL
    UNION
    SELECT name FROM worker_queues
    UNION
    SELECT DISTINCT queue FROM worker_jobs WHERE started IS NOT NULL AND finished IS NULL
)
SELECT n.name,
       coalesce(w.paused, false) AS paused, w.concurrency, w.key_concurrency, w.rate_limit,
       coalesce(w.rate_period_ms, 1000) AS rate_period_ms, coalesce(w.fair, false) AS fair,
       coalesce(w.key_weights, '{}'::jsonb) AS key_weights,
       p.due, p.scheduled, r.running, p.oldest_due_seconds
  FROM names AS n
  LEFT JOIN worker_queues AS w ON w.name = n.name
 CROSS JOIN LATERAL (
    SELECT count(*) FILTER (WHERE j.due <= now()) AS due,
           count(*) FILTER (WHERE j.due > now()) AS scheduled,
           extract(epoch FROM now() - min(j.due) FILTER (WHERE j.due <= now()))::float8
               AS oldest_due_seconds
      FROM worker_jobs AS j
     WHERE j.queue = n.name AND j.started IS NULL AND j.finished IS NULL
 ) AS p
 CROSS JOIN LATERAL (
    SELECT count(*) AS running
      FROM worker_jobs AS j
     WHERE j.queue = n.name AND j.started IS NOT NULL AND j.finished IS NULL
 ) AS r
 ORDER BY n.name
