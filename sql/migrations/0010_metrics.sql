-- qdworker 0010: jobs enqueued, counted by the database (so plain-SQL inserts count too), for
-- /metrics (qdworker_jobs_enqueued_total) and `qdworker status`; an index of the cron chains.
-- Released migrations are never edited: add a new numbered file instead.

-- Rows inserted into worker_jobs by queue and type, kept by the statement-level insert
-- trigger (one upsert per INSERT statement, not per row). Each backend adds to its own shard
-- (pg_backend_pid() % 16): two producers inserting jobs of one type at once do not queue up
-- behind each other's row lock until commit. Readers sum the shards. Counts only grow (a
-- rolled-back insert counts nothing); deleting old jobs does not lower them.
CREATE TABLE qdworker_enqueued (
    queue  text     NOT NULL,
    type   text     NOT NULL,
    shard  smallint NOT NULL,
    jobs   bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, type, shard)
);

COMMENT ON TABLE qdworker_enqueued IS 'qdworker: jobs inserted by queue and type (kept by a trigger; sum the shards).';

INSERT INTO qdworker_enqueued (queue, type, shard, jobs)
SELECT queue, type, 0, count(*) FROM worker_jobs GROUP BY queue, type;

-- One statement counts the rows of an INSERT by queue and type, records new types
-- (qdworker_job_types, as since 0004) and adds the counts; NOTIFY only when rows were inserted
-- (a keep-mode insert may insert none). Measured: bench/enqueue_counter_cost.py.
CREATE OR REPLACE FUNCTION qdworker_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    added bigint;
BEGIN
    WITH counted AS (
        SELECT queue, type, count(*) AS jobs FROM inserted GROUP BY queue, type
    ), types AS (
        INSERT INTO qdworker_job_types (type) SELECT DISTINCT type FROM counted
        ON CONFLICT DO NOTHING
    )
    INSERT INTO qdworker_enqueued AS e (queue, type, shard, jobs)
    SELECT queue, type, pg_backend_pid() % 16, jobs FROM counted
    ON CONFLICT (queue, type, shard) DO UPDATE SET jobs = e.jobs + excluded.jobs;
    GET DIAGNOSTICS added = ROW_COUNT;
    IF added > 0 THEN
        PERFORM pg_notify('qdworker_jobs', 'insert');
    END IF;
    RETURN NULL;
END;
$$;

-- The unfinished row of each cron chain (one per schedule), for the cron lag of /metrics and
-- `qdworker status`: without it that read scans every pending job (70 ms at 1,000,000). Only
-- cron rows get entries, so other inserts and claims do not pay for it.
CREATE INDEX worker_jobs_cron_open_idx ON worker_jobs (type, tag)
 WHERE cron_schedule IS NOT NULL AND finished IS NULL;
