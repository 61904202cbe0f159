-- qdworker 0010: jobs enqueued, counted by the database (so plain-SQL inserts count too), for
-- /metrics (qdworker_jobs_enqueued_total) and `qdworker status`.
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

CREATE OR REPLACE FUNCTION qdworker_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        INSERT INTO qdworker_job_types (type)
        SELECT DISTINCT type FROM inserted
        ON CONFLICT DO NOTHING;
        INSERT INTO qdworker_enqueued AS e (queue, type, shard, jobs)
        SELECT queue, type, pg_backend_pid() % 16, count(*) FROM inserted GROUP BY queue, type
        ON CONFLICT (queue, type, shard) DO UPDATE SET jobs = e.jobs + excluded.jobs;
        PERFORM pg_notify('qdworker_jobs', 'insert');
    END IF;
    RETURN NULL;
END;
$$;
