-- qdworker 0004: what surviving database restarts, failover and unknown job types needs.
-- Released migrations are never edited: add a new numbered file instead.

-- Live workers and the job types they run. Each worker process upserts its row every third of
-- a lease (with its lease renewal) and marks it stopped on a clean exit; rows of dead workers
-- stay a day (their types still count as recently known), then supervisors delete them.
CREATE TABLE qdworker_workers (
    id             text        PRIMARY KEY,             -- worker id, unique per process
    supervisor     text,                                -- its supervisor's id (NULL: none)
    host           text        NOT NULL,
    pid            integer     NOT NULL,
    types          text[]      NOT NULL,                -- job types it registered
    concurrency    integer     NOT NULL,
    lease_seconds  double precision NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    seen_at        timestamptz NOT NULL DEFAULT now(),  -- last heartbeat
    stopped_at     timestamptz                          -- clean exit
);

COMMENT ON TABLE qdworker_workers IS 'qdworker: worker processes (heartbeats every lease/3), for unknown-type detection and monitoring.';

-- Every job type ever inserted (kept by the insert trigger): the types to check against the
-- live workers' without scanning the jobs.
CREATE TABLE qdworker_job_types (
    type        text        PRIMARY KEY,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE qdworker_job_types IS 'qdworker: job types seen in worker_jobs (kept by a trigger).';

INSERT INTO qdworker_job_types (type) SELECT DISTINCT type FROM worker_jobs ON CONFLICT DO NOTHING;

CREATE OR REPLACE FUNCTION qdworker_notify_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM inserted) THEN
        INSERT INTO qdworker_job_types (type)
        SELECT DISTINCT type FROM inserted
        ON CONFLICT DO NOTHING;
        PERFORM pg_notify('qdworker_jobs', 'insert');
    END IF;
    RETURN NULL;
END;
$$;

-- When the server (re)started serving: the first qdworker connection after a restart (a
-- postmaster other than the one recorded) or a failover (another WAL timeline) records now().
-- For one lease after a restart no worker rescues a run whose lease expired, so runs whose
-- workers lived through the outage are renewed, not run twice. After a failover no worker
-- claims anything for one lease: with asynchronous replication the new primary may lack the
-- last claims, and the workers running those jobs need that long to find out and stop (see
-- docs/reliability.md). The first record ever says '-infinity': a new database has no outage
-- behind it.
CREATE TABLE qdworker_server (
    id                  boolean     PRIMARY KEY DEFAULT true CHECK (id),
    postmaster_started  timestamptz NOT NULL,
    timeline            integer     NOT NULL,
    available_since     timestamptz NOT NULL,
    failover            boolean     NOT NULL DEFAULT false
);

COMMENT ON TABLE qdworker_server IS 'qdworker: when this server started serving (restart and failover detection).';

CREATE FUNCTION qdworker_server_epoch(OUT serving_seconds double precision, OUT failover boolean)
LANGUAGE plpgsql AS $$
DECLARE
    tli integer := ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::integer;
    rec record;
BEGIN
    INSERT INTO qdworker_server AS s (id, postmaster_started, timeline, available_since)
    VALUES (true, pg_postmaster_start_time(), tli, '-infinity')
    ON CONFLICT (id) DO UPDATE
       SET postmaster_started = excluded.postmaster_started, timeline = excluded.timeline,
           available_since = now(), failover = s.timeline IS DISTINCT FROM excluded.timeline
     WHERE s.postmaster_started IS DISTINCT FROM excluded.postmaster_started
        OR s.timeline IS DISTINCT FROM excluded.timeline;
    SELECT s.available_since, s.failover INTO rec FROM qdworker_server AS s;
    serving_seconds := CASE WHEN rec.available_since = '-infinity' THEN NULL
                            ELSE extract(epoch FROM now() - rec.available_since) END;
    failover := rec.failover;
END;
$$;

-- Is (job id, claims) still the job's current run? Handlers use it to fence writes to other
-- systems: SELECT qdworker_run_is_current(42, 3).
CREATE FUNCTION qdworker_run_is_current(job_id bigint, claims integer) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM worker_jobs AS j
                    WHERE j.id = job_id AND j.claims = qdworker_run_is_current.claims
                      AND j.started IS NOT NULL AND j.finished IS NULL)
$$;

-- The tag rule marks the jobs it replaces as cancelled (cancel_requested_at), so they count
-- as cancelled, not failed; the result stays QuickDapp's.
CREATE OR REPLACE FUNCTION qdworker_before_insert() RETURNS trigger
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
       SET finished = now(), success = false, updated_at = now(), cancel_requested_at = now(),
           result = '{"error": "Job cancelled due to new job being created"}'::jsonb
     WHERE tag = NEW.tag AND started IS NULL AND finished IS NULL;
    RETURN NEW;
END;
$$;

UPDATE worker_jobs
   SET cancel_requested_at = finished
 WHERE cancel_requested_at IS NULL AND finished IS NOT NULL AND success = false
   AND result = '{"error": "Job cancelled due to new job being created"}'::jsonb;
