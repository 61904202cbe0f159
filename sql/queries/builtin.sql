-- Built-in jobs.

-- name: tag_lock
-- The tag rule's lock (see qdworker_before_insert): serialises work on one tag.
SELECT pg_advisory_xact_lock(1902270661, hashtext(%(tag)s))

-- name: db_now
SELECT now() AS now

-- name: insert_cron_if_absent
-- Run after tag_lock in the same transaction: inserts the cron job unless its chain is alive.
INSERT INTO worker_jobs (tag, type, user_id, data, due, cron_schedule,
                         auto_reschedule_on_failure, auto_reschedule_on_failure_delay)
SELECT %(tag)s, %(type)s, 0, '{}'::jsonb, %(due)s, %(cron_schedule)s, true, %(retry_delay_ms)s
 WHERE NOT EXISTS (SELECT 1 FROM worker_jobs WHERE tag = %(tag)s AND finished IS NULL)
RETURNING id

-- name: remove_old_jobs
-- One bounded batch of cleanup: finished, non-persistent rows past remove_at; dead rows only
-- once they have been dead for %(dead_retention_seconds)s too (0: like every other row).
-- Dead rows kept that way are stepped over by each batch: as many as died in that window.
WITH doomed AS (
    SELECT id FROM worker_jobs
     WHERE finished IS NOT NULL AND NOT persistent AND remove_at < now()
       AND (dead_at IS NULL
            OR dead_at <= now() - %(dead_retention_seconds)s * interval '1 second')
     ORDER BY remove_at
     LIMIT %(batch)s
       FOR UPDATE SKIP LOCKED
), deleted AS (
    DELETE FROM worker_jobs AS j USING doomed WHERE j.id = doomed.id RETURNING 1
)
SELECT count(*)::int AS n FROM deleted
