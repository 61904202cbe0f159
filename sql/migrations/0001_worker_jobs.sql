-- qdworker 0001: the worker_jobs table (QuickDapp's columns, snake_case) plus what claiming,
-- crash recovery, retries and timeouts need; the tag rule, defaults and the wake-up NOTIFY.
-- Released migrations are never edited: add a new numbered file instead.

CREATE TABLE worker_jobs (
    id                                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tag                               text        NOT NULL,  -- BEFORE INSERT trigger: 'job:<id>' when omitted
    type                              text        NOT NULL,
    user_id                           bigint      NOT NULL DEFAULT 0,
    data                              jsonb       NOT NULL DEFAULT '{}'::jsonb,
    due                               timestamptz NOT NULL DEFAULT now(),
    started                           timestamptz,
    finished                          timestamptz,
    remove_at                         timestamptz NOT NULL,  -- BEFORE INSERT trigger: due + remove_delay
    success                           boolean,
    result                            jsonb,
    cron_schedule                     text,
    auto_reschedule_on_failure        boolean     NOT NULL DEFAULT false,
    auto_reschedule_on_failure_delay  bigint      NOT NULL DEFAULT 0,      -- milliseconds
    remove_delay                      bigint      NOT NULL DEFAULT 0,      -- milliseconds; 0 = one hour
    rescheduled_from_job              bigint,
    persistent                        boolean     NOT NULL DEFAULT false,
    created_at                        timestamptz NOT NULL DEFAULT now(),
    updated_at                        timestamptz NOT NULL DEFAULT now(),
    -- qdworker additions ---------------------------------------------------------------
    attempt                           integer     NOT NULL DEFAULT 1,      -- 1-based, across the retry chain
    max_attempts                      integer,                             -- NULL: unlimited (QuickDapp)
    backoff                           text        NOT NULL DEFAULT 'fixed',
    timeout_seconds                   double precision,                    -- NULL: the job type's timeout
    claims                            integer     NOT NULL DEFAULT 0,      -- fencing token: +1 per claim
    lost_runs                         integer     NOT NULL DEFAULT 0,      -- runs lost with their worker
    lease_owner                       text,                                -- worker id while running
    lease_expires_at                  timestamptz,                         -- renewed while running
    cancel_requested_at               timestamptz,                         -- cancel_job() on a running job

    CONSTRAINT worker_jobs_type_check CHECK (length(btrim(type)) BETWEEN 1 AND 255 AND length(type) <= 255),
    CONSTRAINT worker_jobs_tag_check CHECK (length(btrim(tag)) BETWEEN 1 AND 255 AND length(tag) <= 255),
    CONSTRAINT worker_jobs_user_id_check CHECK (user_id >= 0),
    CONSTRAINT worker_jobs_data_check CHECK (jsonb_typeof(data) = 'object'),
    CONSTRAINT worker_jobs_cron_schedule_check CHECK (cron_schedule IS NULL OR length(btrim(cron_schedule)) BETWEEN 1 AND 255),
    CONSTRAINT worker_jobs_delay_check CHECK (auto_reschedule_on_failure_delay >= 0),
    CONSTRAINT worker_jobs_remove_delay_check CHECK (remove_delay >= 0),
    CONSTRAINT worker_jobs_attempt_check CHECK (attempt >= 1),
    CONSTRAINT worker_jobs_max_attempts_check CHECK (max_attempts IS NULL OR max_attempts >= 1),
    CONSTRAINT worker_jobs_backoff_check CHECK (backoff IN ('fixed', 'exponential')),
    CONSTRAINT worker_jobs_timeout_check CHECK (timeout_seconds IS NULL OR timeout_seconds > 0)
);

COMMENT ON TABLE worker_jobs IS 'qdworker jobs: insert a row to schedule a job (see README.rst).';

-- Claim path: pending rows in due order (a claimed row leaves this index).
CREATE INDEX worker_jobs_pending_idx ON worker_jobs (due, id) WHERE started IS NULL AND finished IS NULL;
-- Running rows by lease expiry: lost runs to rescue, a worker's leases to renew.
CREATE INDEX worker_jobs_running_idx ON worker_jobs (lease_expires_at) WHERE started IS NOT NULL AND finished IS NULL;
-- Tag rule: pending rows by tag.
CREATE INDEX worker_jobs_pending_tag_idx ON worker_jobs (tag) WHERE started IS NULL AND finished IS NULL;
-- Cleanup path: finished, non-persistent rows by remove_at.
CREATE INDEX worker_jobs_cleanup_idx ON worker_jobs (remove_at) WHERE finished IS NOT NULL AND NOT persistent;

-- Defaults that depend on other columns, and QuickDapp's tag rule. Runs for every insert,
-- whoever makes it. Same-tag inserts are serialised by a transaction-scoped advisory lock on
-- the tag, so concurrent inserts of one tag leave exactly one pending row (READ COMMITTED:
-- the UPDATE below takes a fresh snapshot after the lock is granted).
CREATE FUNCTION qdworker_before_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.created_at := now();
    NEW.updated_at := now();
    IF NEW.remove_at IS NULL THEN
        NEW.remove_at := NEW.due + CASE WHEN NEW.remove_delay = 0 THEN interval '1 hour'
                                        ELSE NEW.remove_delay * interval '1 millisecond' END;
    END IF;
    IF NEW.tag IS NULL THEN
        -- A tag of its own replaces nothing: no lock, no search.
        NEW.tag := 'job:' || NEW.id;
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(1902270661, hashtext(NEW.tag));
    UPDATE worker_jobs
       SET finished = now(), success = false, updated_at = now(),
           result = '{"error": "Job cancelled due to new job being created"}'::jsonb
     WHERE tag = NEW.tag AND started IS NULL AND finished IS NULL;
    RETURN NEW;
END;
$$;

CREATE TRIGGER worker_jobs_before_insert
    BEFORE INSERT ON worker_jobs
    FOR EACH ROW EXECUTE FUNCTION qdworker_before_insert();

-- Wake the workers: one NOTIFY per INSERT statement that inserted rows, delivered at commit.
-- The payload is a hint, never data.
CREATE FUNCTION qdworker_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        PERFORM pg_notify('qdworker_jobs', 'insert');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER worker_jobs_notify_insert
    AFTER INSERT ON worker_jobs
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION qdworker_notify_insert();

-- Cancel a job from any language: SELECT qdworker_cancel_job(42, 'no longer needed').
-- A pending job is finished at once (success false); a running one is flagged and its worker
-- told through NOTIFY qdworker_cancel, which cancels the handler. Returns what happened:
-- 'cancelled', 'cancelling' (running; the worker finishes it), 'finished' (no-op) or 'not_found'.
CREATE FUNCTION qdworker_cancel_job(job_id bigint, reason text DEFAULT NULL) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    job record;
    why text := left(coalesce(nullif(btrim(reason), ''), 'cancelled by request'), 500);
BEGIN
    SELECT id, started, finished INTO job FROM worker_jobs WHERE id = job_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'not_found';
    ELSIF job.finished IS NOT NULL THEN
        RETURN 'finished';
    ELSIF job.started IS NULL THEN
        UPDATE worker_jobs
           SET finished = now(), success = false, updated_at = now(), cancel_requested_at = now(),
               result = jsonb_build_object('error', 'Job cancelled: ' || why, 'error_type', 'JobCancelled')
         WHERE id = job_id;
        RETURN 'cancelled';
    ELSE
        UPDATE worker_jobs SET cancel_requested_at = now(), updated_at = now() WHERE id = job_id;
        PERFORM pg_notify('qdworker_cancel', json_build_object('id', job_id, 'reason', why)::text);
        RETURN 'cancelling';
    END IF;
END;
$$;
