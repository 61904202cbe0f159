-- qdworker 0005: named queues, priorities with aging, concurrency keys, and per-queue settings
-- (pause, cluster-wide concurrency, per-key concurrency, rate limit, fair share).
-- Released migrations are never edited: add a new numbered file instead.
--
-- A job inserted with only type and data lands in queue 'default' with priority 0 and no key,
-- and a queue without a worker_queues row has no limits: QuickDapp's behaviour.

ALTER TABLE worker_jobs
    ADD COLUMN queue           text    NOT NULL DEFAULT 'default',
    ADD COLUMN priority        integer NOT NULL DEFAULT 0,     -- higher runs first (see below)
    ADD COLUMN concurrency_key text,                           -- e.g. 'tenant:42'; NULL: none
    ADD CONSTRAINT worker_jobs_queue_check
        CHECK (length(btrim(queue)) BETWEEN 1 AND 255 AND length(queue) <= 255),
    ADD CONSTRAINT worker_jobs_priority_check CHECK (priority BETWEEN -1000000 AND 1000000),
    ADD CONSTRAINT worker_jobs_concurrency_key_check
        CHECK (concurrency_key IS NULL OR length(concurrency_key) BETWEEN 1 AND 255);

-- The order jobs of a queue start in: each priority step counts as one minute of waiting.
-- A job's effective priority is its priority plus the minutes it has waited since it was due,
-- and jobs start in order of effective priority, which is this order (the earliest first).
-- So a job waits at most (p - its priority) minutes behind higher-priority work of priority
-- p that arrives after it. IMMUTABLE (minutes do not depend on the time zone): indexable.
CREATE FUNCTION qdworker_run_order(due timestamptz, priority integer) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT due - priority * interval '1 minute'
$$;

-- Claim path: pending rows of each queue in run order (a claimed row leaves this index).
CREATE INDEX worker_jobs_queue_pending_idx
    ON worker_jobs (queue, qdworker_run_order(due, priority), id)
 WHERE started IS NULL AND finished IS NULL;
-- Per-key claims (key limits, fair share): pending rows with a key, by queue and key.
CREATE INDEX worker_jobs_key_pending_idx
    ON worker_jobs (queue, concurrency_key, qdworker_run_order(due, priority), id)
 WHERE started IS NULL AND finished IS NULL AND concurrency_key IS NOT NULL;
-- Running rows by queue and key: what a limited queue's claim counts.
CREATE INDEX worker_jobs_queue_running_idx
    ON worker_jobs (queue, concurrency_key)
 WHERE started IS NOT NULL AND finished IS NULL;

-- Settings of the queues that have any; a queue without a row has none. Change them with plain
-- SQL (INSERT ... ON CONFLICT / UPDATE), `python -m qdworker queue ...` or the API; every worker
-- hears of a change at once (NOTIFY qdworker_queues) and applies it to its next claim.
CREATE TABLE worker_queues (
    name             text        PRIMARY KEY,
    paused           boolean     NOT NULL DEFAULT false,  -- start nothing new
    concurrency      integer,    -- running jobs of the queue, cluster-wide (NULL: no limit)
    key_concurrency  integer,    -- running jobs per concurrency_key, cluster-wide (NULL: none)
    rate_limit       integer,    -- job starts per rate_period_ms, cluster-wide (NULL: none)
    rate_period_ms   integer     NOT NULL DEFAULT 1000,
    fair             boolean     NOT NULL DEFAULT false,  -- share capacity between keys
    key_weights      jsonb       NOT NULL DEFAULT '{}'::jsonb,  -- {"tenant:42": 3}; others 1
    updated_at       timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT worker_queues_name_check
        CHECK (length(btrim(name)) BETWEEN 1 AND 255 AND length(name) <= 255),
    CONSTRAINT worker_queues_concurrency_check CHECK (concurrency IS NULL OR concurrency >= 1),
    CONSTRAINT worker_queues_key_concurrency_check
        CHECK (key_concurrency IS NULL OR key_concurrency >= 1),
    CONSTRAINT worker_queues_rate_limit_check
        CHECK (rate_limit IS NULL OR rate_limit BETWEEN 1 AND 100000),
    CONSTRAINT worker_queues_rate_period_check CHECK (rate_period_ms BETWEEN 1 AND 86400000),
    CONSTRAINT worker_queues_key_weights_check CHECK (jsonb_typeof(key_weights) = 'object')
);

COMMENT ON TABLE worker_queues IS 'qdworker: per-queue settings (pause, limits, fair share); see README.rst.';

-- Does this settings row limit its queue (so claims of it go through qdworker_claim_limited)?
CREATE FUNCTION qdworker_queue_is_limited(q worker_queues) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT q.concurrency IS NOT NULL OR q.key_concurrency IS NOT NULL
        OR q.rate_limit IS NOT NULL OR q.fair
$$;

-- The starts of rate-limited queues within their window (kept by qdworker_claim_limited).
CREATE TABLE qdworker_queue_state (
    queue   text          PRIMARY KEY,
    starts  timestamptz[] NOT NULL DEFAULT '{}'   -- ascending, at most rate_limit entries
);

COMMENT ON TABLE qdworker_queue_state IS 'qdworker: recent job starts of rate-limited queues.';

-- Tell the workers (their settings and their claims) when settings change.
CREATE FUNCTION qdworker_queues_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('qdworker_queues', TG_OP);
    PERFORM pg_notify('qdworker_jobs', 'queues');
    RETURN NULL;
END;
$$;

CREATE TRIGGER worker_queues_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON worker_queues
    FOR EACH STATEMENT EXECUTE FUNCTION qdworker_queues_changed();
