-- qdworker 0007: dead letters. A run whose failure is final (failed, not cancelled, and no
-- retry or next cron tick was scheduled for it) is dead: worker_jobs.dead_at says since when.
-- Dead jobs are listed by one index and redriven one by one or in bulk by filter, each as a
-- new attempt linked to the dead row; the dead row then leaves the dead state.
-- Released migrations are never edited: add a new numbered file instead.

ALTER TABLE worker_jobs ADD COLUMN dead_at timestamptz;  -- NULL: not dead (or redriven)

-- Rows that failed for good before this migration: failed, not cancelled (the tag rule and
-- qdworker_cancel_job set cancel_requested_at), and followed by no retry or cron tick.
UPDATE worker_jobs AS j
   SET dead_at = j.finished
 WHERE j.finished IS NOT NULL AND NOT j.success AND j.cancel_requested_at IS NULL
   AND j.result->>'error_type' IS DISTINCT FROM 'JobCancelled'
   AND NOT EXISTS (SELECT 1 FROM worker_jobs AS s WHERE s.rescheduled_from_job = j.id);

-- Listing and bulk redrive: dead rows by the time they died.
CREATE INDEX worker_jobs_dead_idx ON worker_jobs (dead_at, id) WHERE dead_at IS NOT NULL;

-- Redrive one dead job from any language: SELECT qdworker_retry_job(42).
-- Inserts a new pending row, due now, copying every user field, with rescheduled_from_job =
-- the dead row, attempt + 1 and a fresh retry budget (max_attempts grows by the attempts
-- spent; NULL stays NULL), and clears the dead row's dead_at. Returns the new row's id, or
-- NULL (nothing inserted) when the job is not dead (not found, not failed for good, or
-- redriven already) or when another unfinished job has its tag (that newer job supersedes it;
-- inserting would cancel it by the tag rule). The dead row is locked, so concurrent redrives
-- of one job create one new attempt; the tag's lock (the insert trigger's) makes the tag
-- check race-free.
CREATE FUNCTION qdworker_retry_job(job_id bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    old worker_jobs;
    created bigint;
BEGIN
    SELECT * INTO old FROM worker_jobs AS j
     WHERE j.id = qdworker_retry_job.job_id AND j.dead_at IS NOT NULL
       FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1902270661, hashtext(old.tag));
    IF EXISTS (SELECT 1 FROM worker_jobs AS j WHERE j.tag = old.tag AND j.finished IS NULL) THEN
        RETURN NULL;
    END IF;
    INSERT INTO worker_jobs (
        tag, type, user_id, data, cron_schedule, auto_reschedule_on_failure,
        auto_reschedule_on_failure_delay, remove_delay, persistent, max_attempts, backoff,
        timeout_seconds, queue, priority, concurrency_key, rescheduled_from_job, attempt)
    VALUES (
        old.tag, old.type, old.user_id, old.data, old.cron_schedule,
        old.auto_reschedule_on_failure, old.auto_reschedule_on_failure_delay, old.remove_delay,
        old.persistent, old.max_attempts + old.attempt, old.backoff, old.timeout_seconds,
        old.queue, old.priority, old.concurrency_key, old.id, old.attempt + 1)
    RETURNING id INTO created;
    UPDATE worker_jobs SET dead_at = NULL, updated_at = now() WHERE id = old.id;
    RETURN created;
END;
$$;

-- Redrive dead jobs in bulk from any language, oldest death first:
-- SELECT * FROM qdworker_retry_dead(job_type => 'sendEmail', since => now() - interval '1 day').
-- Filters (NULL: any): type, queue, result->>'error_type', dead_at >= since, dead_at < until.
-- At most max_jobs (1 to 100000, else SQLSTATE 22023) dead rows are taken, skipping rows
-- another transaction holds; each is redriven as qdworker_retry_job does. One row per dead
-- job taken: (old_id, new_id), new_id NULL when it was skipped because another unfinished job
-- has its tag (it stays dead). The inserts wake the workers with one NOTIFY at commit.
CREATE FUNCTION qdworker_retry_dead(
    job_type text DEFAULT NULL, queue text DEFAULT NULL, error_type text DEFAULT NULL,
    since timestamptz DEFAULT NULL, until timestamptz DEFAULT NULL,
    max_jobs integer DEFAULT 1000
) RETURNS TABLE(old_id bigint, new_id bigint)
LANGUAGE plpgsql AS $$
DECLARE
    candidate bigint;
BEGIN
    IF max_jobs IS NULL OR max_jobs NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'qdworker_retry_dead: max_jobs must be between 1 and 100000, got %',
                        coalesce(max_jobs::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    FOR candidate IN
        SELECT j.id FROM worker_jobs AS j
         WHERE j.dead_at IS NOT NULL
           AND (qdworker_retry_dead.job_type IS NULL OR j.type = qdworker_retry_dead.job_type)
           AND (qdworker_retry_dead.queue IS NULL OR j.queue = qdworker_retry_dead.queue)
           AND (qdworker_retry_dead.error_type IS NULL
                OR j.result->>'error_type' = qdworker_retry_dead.error_type)
           AND (qdworker_retry_dead.since IS NULL OR j.dead_at >= qdworker_retry_dead.since)
           AND (qdworker_retry_dead.until IS NULL OR j.dead_at < qdworker_retry_dead.until)
         ORDER BY j.dead_at, j.id
         LIMIT max_jobs
           FOR UPDATE SKIP LOCKED
    LOOP
        old_id := candidate;
        new_id := qdworker_retry_job(candidate);
        RETURN NEXT;
    END LOOP;
END;
$$;
