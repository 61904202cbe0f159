-- qdworker 0008: what the dashboard and /metrics read about the whole cluster, so that every
-- supervisor shows the same figures and a restart loses none of them.
-- Released migrations are never edited: add a new numbered file instead.

-- Job outcomes by 10-second bucket. Each supervisor adds what its workers reported (it is the
-- only writer of its own rows: no contention), every few seconds; old buckets are deleted by
-- the maintenance round. pickup_ms_hist counts started runs by how late they started (started
-- - due, in ms), one entry per bound of qdworker._protocol.PICKUP_BOUNDS_MS plus one for
-- everything above the last bound.
CREATE TABLE qdworker_throughput (
    bucket          timestamptz NOT NULL,           -- start of the bucket
    supervisor      text        NOT NULL,
    queue           text        NOT NULL,
    type            text        NOT NULL,
    started         bigint      NOT NULL DEFAULT 0,
    succeeded       bigint      NOT NULL DEFAULT 0,
    failed          bigint      NOT NULL DEFAULT 0, -- every failed run (retried or not)
    run_ms          bigint      NOT NULL DEFAULT 0, -- summed wall time of the finished runs
    pickup_ms_hist  bigint[]    NOT NULL DEFAULT '{}',
    PRIMARY KEY (bucket, supervisor, queue, type)
);

COMMENT ON TABLE qdworker_throughput IS 'qdworker: job outcomes per 10-second bucket, per supervisor (dashboard, metrics).';

-- What each worker process reports with its heartbeat (every lease/3), for the dashboard's
-- workers page and the cluster gauges: its slot in its supervisor, how often that slot's
-- process was restarted, its resident memory and the jobs it ran.
ALTER TABLE qdworker_workers
    ADD COLUMN slot        integer,
    ADD COLUMN restarts    integer NOT NULL DEFAULT 0,
    ADD COLUMN rss_bytes   bigint,
    ADD COLUMN jobs_run    bigint  NOT NULL DEFAULT 0,
    ADD COLUMN jobs_failed bigint  NOT NULL DEFAULT 0;
