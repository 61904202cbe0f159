-- Submitting, reading, cancelling and redriving jobs (client API).

-- name: insert_jobs
-- One round trip for any number of jobs: a JSON array of objects with the user fields
-- (plus delay_ms, a due time relative to the database clock). Defaults match plain SQL inserts.
-- The submitter's trace context (trace_context) comes with each entry when it has one.
-- Returns every column (rows become Jobs by column name) of each job inserted, so nothing for
-- an entry the insert trigger skipped (on_tag_conflict 'keep'): batches with keep-mode
-- entries use insert_jobs_per_entry.
INSERT INTO worker_jobs (
    tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
    auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
    timeout_seconds, queue, priority, concurrency_key, on_tag_conflict, trace_context,
    depends_on, on_parent_failure)
SELECT j.tag, j.type, coalesce(j.user_id, 0), coalesce(j.data, '{}'::jsonb),
       coalesce(j.due, now() + coalesce(j.delay_ms, 0) * interval '1 millisecond'),
       j.cron_schedule, coalesce(j.auto_reschedule_on_failure, false),
       coalesce(j.auto_reschedule_on_failure_delay, 0), coalesce(j.remove_delay, 0),
       coalesce(j.persistent, false), j.max_attempts, coalesce(j.backoff, 'fixed'),
       j.timeout_seconds, coalesce(j.queue, 'default'), coalesce(j.priority, 0),
       j.concurrency_key, coalesce(j.on_tag_conflict, 'replace'), j.trace_context,
       j.depends_on, coalesce(j.on_parent_failure, 'cancel')
  FROM jsonb_to_recordset(%(jobs)s::jsonb) AS j(
       tag text, type text, user_id bigint, data jsonb, due timestamptz, delay_ms double precision,
       cron_schedule text, auto_reschedule_on_failure boolean,
       auto_reschedule_on_failure_delay bigint, remove_delay bigint, persistent boolean,
       max_attempts integer, backoff text, timeout_seconds double precision, queue text,
       priority integer, concurrency_key text, on_tag_conflict text, trace_context jsonb,
       depends_on bigint[], on_parent_failure text)
RETURNING *

-- name: insert_jobs_per_entry
-- insert_jobs for batches with keep-mode entries (it costs about half as much again).
-- Returns one row per entry, in the order given: every column of the inserted job (rows become
-- Jobs by column name), or all NULL for an entry the insert trigger skipped (on_tag_conflict
-- 'keep' and its tag has an unfinished job). Rows are inserted in the order given, so of
-- keep-mode entries sharing a tag only the first can be inserted. Each entry's id is drawn
-- first, from the column's own sequence, so that a skipped entry is known by the id it lacks.
WITH entry AS MATERIALIZED (
    SELECT a.ord, nextval(s.seq) AS id, j.*
      FROM jsonb_array_elements(%(jobs)s::jsonb) WITH ORDINALITY AS a(job, ord)
     CROSS JOIN (SELECT pg_get_serial_sequence('worker_jobs', 'id')::regclass AS seq) AS s
     CROSS JOIN LATERAL jsonb_to_record(a.job) AS j(
           tag text, type text, user_id bigint, data jsonb, due timestamptz,
           delay_ms double precision, cron_schedule text, auto_reschedule_on_failure boolean,
           auto_reschedule_on_failure_delay bigint, remove_delay bigint, persistent boolean,
           max_attempts integer, backoff text, timeout_seconds double precision, queue text,
           priority integer, concurrency_key text, on_tag_conflict text, trace_context jsonb,
           depends_on bigint[], on_parent_failure text)
     ORDER BY a.ord
), inserted AS (
    INSERT INTO worker_jobs (
        id, tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
        timeout_seconds, queue, priority, concurrency_key, on_tag_conflict, trace_context,
        depends_on, on_parent_failure)
    OVERRIDING SYSTEM VALUE
    SELECT e.id, e.tag, e.type, coalesce(e.user_id, 0), coalesce(e.data, '{}'::jsonb),
           coalesce(e.due, now() + coalesce(e.delay_ms, 0) * interval '1 millisecond'),
           e.cron_schedule, coalesce(e.auto_reschedule_on_failure, false),
           coalesce(e.auto_reschedule_on_failure_delay, 0), coalesce(e.remove_delay, 0),
           coalesce(e.persistent, false), e.max_attempts, coalesce(e.backoff, 'fixed'),
           e.timeout_seconds, coalesce(e.queue, 'default'), coalesce(e.priority, 0),
           e.concurrency_key, coalesce(e.on_tag_conflict, 'replace'), e.trace_context,
           e.depends_on, coalesce(e.on_parent_failure, 'cancel')
      FROM entry AS e
     ORDER BY e.ord
    RETURNING *
)
SELECT i.*
  FROM entry AS e LEFT JOIN inserted AS i ON i.id = e.id
 ORDER BY e.ord

-- name: insert_job
-- One job, the fast path of submit_job (a prepared statement; same defaults as insert_jobs).
-- Returns no row when the insert trigger skipped it (on_tag_conflict 'keep').
INSERT INTO worker_jobs (
    tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
    auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
    timeout_seconds, queue, priority, concurrency_key, on_tag_conflict, trace_context,
    depends_on, on_parent_failure)
VALUES (%(tag)s::text, %(type)s::text, coalesce(%(user_id)s::bigint, 0),
        coalesce(%(data)s::jsonb, '{}'::jsonb),
        coalesce(%(due)s::timestamptz,
                 now() + coalesce(%(delay_ms)s::float8, 0) * interval '1 millisecond'),
        %(cron_schedule)s::text, coalesce(%(auto_reschedule_on_failure)s::boolean, false),
        coalesce(%(auto_reschedule_on_failure_delay)s::bigint, 0),
        coalesce(%(remove_delay)s::bigint, 0), coalesce(%(persistent)s::boolean, false),
        %(max_attempts)s::integer, coalesce(%(backoff)s::text, 'fixed'),
        %(timeout_seconds)s::float8, coalesce(%(queue)s::text, 'default'),
        coalesce(%(priority)s::integer, 0), %(concurrency_key)s::text,
        coalesce(%(on_tag_conflict)s::text, 'replace'), %(trace_context)s::jsonb,
        %(depends_on)s::bigint[], coalesce(%(on_parent_failure)s::text, 'cancel'))
RETURNING *

-- name: insert_jobs_then
-- A batch (%(jobs)s, as insert_jobs) and one job (%(then)s, one object of the same fields)
-- that depends on every job of it, in one statement (one round trip, one transaction). Its
-- depends_on is the batch's ids (plus any the object names). Returns the batch's rows, then
-- the dependent's last (``is_then``).
WITH batch AS (
    INSERT INTO worker_jobs (
        tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
        timeout_seconds, queue, priority, concurrency_key, on_tag_conflict, trace_context,
        depends_on, on_parent_failure)
    SELECT j.tag, j.type, coalesce(j.user_id, 0), coalesce(j.data, '{}'::jsonb),
           coalesce(j.due, now() + coalesce(j.delay_ms, 0) * interval '1 millisecond'),
           j.cron_schedule, coalesce(j.auto_reschedule_on_failure, false),
           coalesce(j.auto_reschedule_on_failure_delay, 0), coalesce(j.remove_delay, 0),
           coalesce(j.persistent, false), j.max_attempts, coalesce(j.backoff, 'fixed'),
           j.timeout_seconds, coalesce(j.queue, 'default'), coalesce(j.priority, 0),
           j.concurrency_key, coalesce(j.on_tag_conflict, 'replace'), j.trace_context,
           j.depends_on, coalesce(j.on_parent_failure, 'cancel')
      FROM jsonb_to_recordset(%(jobs)s::jsonb) AS j(
           tag text, type text, user_id bigint, data jsonb, due timestamptz,
           delay_ms double precision, cron_schedule text, auto_reschedule_on_failure boolean,
           auto_reschedule_on_failure_delay bigint, remove_delay bigint, persistent boolean,
           max_attempts integer, backoff text, timeout_seconds double precision, queue text,
           priority integer, concurrency_key text, on_tag_conflict text, trace_context jsonb,
           depends_on bigint[], on_parent_failure text)
    RETURNING *
), then_job AS (
    INSERT INTO worker_jobs (
        tag, type, user_id, data, due, cron_schedule, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
        timeout_seconds, queue, priority, concurrency_key, on_tag_conflict, trace_context,
        depends_on, on_parent_failure)
    SELECT j.tag, j.type, coalesce(j.user_id, 0), coalesce(j.data, '{}'::jsonb),
           coalesce(j.due, now() + coalesce(j.delay_ms, 0) * interval '1 millisecond'),
           j.cron_schedule, coalesce(j.auto_reschedule_on_failure, false),
           coalesce(j.auto_reschedule_on_failure_delay, 0), coalesce(j.remove_delay, 0),
           coalesce(j.persistent, false), j.max_attempts, coalesce(j.backoff, 'fixed'),
           j.timeout_seconds, coalesce(j.queue, 'default'), coalesce(j.priority, 0),
           j.concurrency_key, coalesce(j.on_tag_conflict, 'replace'), j.trace_context,
           coalesce(j.depends_on, '{}') || (SELECT array_agg(b.id ORDER BY b.id) FROM batch AS b),
           coalesce(j.on_parent_failure, 'cancel')
      FROM jsonb_to_record(%(then)s::jsonb) AS j(
           tag text, type text, user_id bigint, data jsonb, due timestamptz,
           delay_ms double precision, cron_schedule text, auto_reschedule_on_failure boolean,
           auto_reschedule_on_failure_delay bigint, remove_delay bigint, persistent boolean,
           max_attempts integer, backoff text, timeout_seconds double precision, queue text,
           priority integer, concurrency_key text, on_tag_conflict text, trace_context jsonb,
           depends_on bigint[], on_parent_failure text)
    RETURNING *
)
SELECT *, false AS is_then FROM batch
UNION ALL
SELECT *, true AS is_then FROM then_job

-- name: tag_holders
-- The newest unfinished (pending or running) job of each of %(tags)s: the jobs keep-mode
-- inserts were skipped for. A statement of its own, run after the insert, so it sees jobs
-- committed after the insert's snapshot was taken. Each half uses its partial index.
SELECT DISTINCT ON (tag) *
  FROM (SELECT * FROM worker_jobs
         WHERE tag = ANY(%(tags)s::text[]) AND started IS NULL AND finished IS NULL
        UNION ALL
        SELECT * FROM worker_jobs
         WHERE tag = ANY(%(tags)s::text[]) AND started IS NOT NULL AND finished IS NULL
       ) AS unfinished
 ORDER BY tag, id DESC

-- name: get_job
SELECT * FROM worker_jobs WHERE id = %(id)s

-- name: cancel_job
SELECT qdworker_cancel_job(%(id)s, %(reason)s) AS outcome

-- name: get_jobs
-- Jobs by id, in id order.
SELECT * FROM worker_jobs WHERE id = ANY(%(ids)s::bigint[]) ORDER BY id

-- name: dead_jobs
-- Dead jobs (failed for good), the latest death first: filtered (NULL: any) by type, queue,
-- result->>'error_type' and dead_at in [since, until); at most %(limit)s.
SELECT * FROM worker_jobs
 WHERE dead_at IS NOT NULL
   AND (%(type)s::text IS NULL OR type = %(type)s::text)
   AND (%(queue)s::text IS NULL OR queue = %(queue)s::text)
   AND (%(error_type)s::text IS NULL OR result->>'error_type' = %(error_type)s::text)
   AND dead_at >= coalesce(%(since)s::timestamptz, '-infinity')
   AND dead_at < coalesce(%(until)s::timestamptz, 'infinity')
 ORDER BY dead_at DESC, id DESC
 LIMIT %(limit)s

-- name: retry_job
-- Redrive one dead job (see qdworker_retry_job): the new attempt's id, or NULL.
SELECT qdworker_retry_job(%(id)s) AS new_id

-- name: retry_dead
-- Redrive up to %(limit)s dead jobs matching the filters (see qdworker_retry_dead).
SELECT old_id, new_id
  FROM qdworker_retry_dead(job_type => %(type)s::text, queue => %(queue)s::text,
                           error_type => %(error_type)s::text,
                           since => %(since)s::timestamptz, until => %(until)s::timestamptz,
                           max_jobs => %(limit)s::integer)
