-- qdworker 0013: dependencies (fan-out, fan-in). A job may name jobs it depends on
-- (depends_on); it becomes due when every one of them has succeeded. Plain SQL is enough:
--   INSERT INTO worker_jobs (type, data, depends_on) VALUES ('merge', '{}', ARRAY[1, 2, 3]);
-- Released migrations are never edited: add a new numbered file instead.
--
-- A parent is its retry chain: the named row, then the row that retried it
-- (rescheduled_from_job), and so on. The chain succeeds when a row of it succeeds; it fails
-- for good when a row of it fails with no successor (dead, or cancelled). The database keeps
-- the bookkeeping: the insert trigger counts the chains still open (waiting_on) and flags
-- their current rows (has_dependents, copied to a retry); when a flagged row ends its chain,
-- the finish trigger counts it off in each dependent (one at a time, in id order) and makes
-- the dependent due when nothing is left. A waiting job's due is 9999-01-01 UTC (finite, so
-- every client can read it): it sorts after every due job in the claim index, and the claim
-- stops its scan at run order 9000-01-01 (an index bound) before reaching it.
ALTER TABLE worker_jobs
    ADD COLUMN depends_on        bigint[],
    -- What a parent that fails for good does to this job: 'cancel' it (finished, failed,
    -- its result names the parent), or let it 'run' anyway once the other parents are done.
    ADD COLUMN on_parent_failure text NOT NULL DEFAULT 'cancel'
        CONSTRAINT worker_jobs_on_parent_failure_check
        CHECK (on_parent_failure IN ('cancel', 'run')),
    -- Parents (retry chains) not finished yet; kept by the triggers below.
    ADD COLUMN waiting_on        integer NOT NULL DEFAULT 0,
    -- Some unfinished job depends on this row's chain (set by the dependent's insert).
    ADD COLUMN has_dependents    boolean NOT NULL DEFAULT false;

-- The dependents of a chain that ended, found by the rows of the chain. Partial: rows without
-- dependencies (almost all) cost no entry; a dependent leaves it when it finishes. Without
-- the pending list (fastupdate off), which every lookup would read through: a dependent of
-- 5,000 parents puts 5,000 entries in it at once.
CREATE INDEX worker_jobs_depends_idx ON worker_jobs USING gin (depends_on)
  WITH (fastupdate = off)
 WHERE depends_on IS NOT NULL AND finished IS NULL;

-- Where the retry chain of job_id stands: its current row (end_id) and 'open' (unfinished),
-- 'succeeded', 'failed' (failed with no successor) or 'missing' (no row job_id).
CREATE FUNCTION qdworker_chain_end(job_id bigint, OUT end_id bigint, OUT state text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    done timestamptz;
    ok boolean;
    next_id bigint;
BEGIN
    end_id := job_id;
    LOOP
        SELECT j.finished, j.success INTO done, ok FROM worker_jobs AS j WHERE j.id = end_id;
        IF NOT FOUND THEN
            state := 'missing';
            RETURN;
        ELSIF done IS NULL THEN
            state := 'open';
            RETURN;
        ELSIF ok THEN
            state := 'succeeded';
            RETURN;
        END IF;
        SELECT min(j.id) INTO next_id FROM worker_jobs AS j WHERE j.rescheduled_from_job = end_id;
        IF next_id IS NULL THEN
            state := 'failed';
            RETURN;
        END IF;
        end_id := next_id;
    END LOOP;
END;
$$;

-- Before insert (after worker_jobs_before_insert: triggers fire in name order): check the
-- parents, flag the open ones (row locks, in id order: a parent finishing at the same time
-- either sees the flag or is seen finished), count them. A parent that already failed for
-- good cancels the job at once (unless on_parent_failure = 'run'). A retry or cron tick of a
-- dependent (rescheduled_from_job) waits for nothing: its parents were settled.
-- Errors: a NULL in depends_on, or an id with no row (foreign_key_violation, naming the id).
CREATE FUNCTION qdworker_depends_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    parent bigint;
    chain record;
    seen bigint[] := '{}';
    failed bigint;
BEGIN
    NEW.waiting_on := 0;
    NEW.has_dependents := NEW.has_dependents AND NEW.rescheduled_from_job IS NOT NULL;
    IF NEW.depends_on IS NULL OR NEW.rescheduled_from_job IS NOT NULL THEN
        RETURN NEW;
    END IF;
    IF array_position(NEW.depends_on, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'depends_on holds a NULL' USING ERRCODE = 'not_null_violation';
    END IF;
    FOR parent IN SELECT DISTINCT p FROM unnest(NEW.depends_on) AS p ORDER BY p LOOP
        LOOP
            SELECT * INTO chain FROM qdworker_chain_end(parent);
            IF chain.state = 'missing' THEN
                RAISE EXCEPTION 'depends_on names job %, which does not exist', parent
                      USING ERRCODE = 'foreign_key_violation';
            END IF;
            EXIT WHEN chain.state <> 'open' OR chain.end_id = ANY(seen);
            UPDATE worker_jobs SET has_dependents = true
             WHERE id = chain.end_id AND finished IS NULL;
            IF FOUND THEN
                seen := seen || chain.end_id;
                EXIT;
            END IF;  -- it finished meanwhile: look again
        END LOOP;
        IF chain.state = 'failed' AND failed IS NULL THEN
            failed := parent;
        END IF;
    END LOOP;
    IF failed IS NOT NULL AND NEW.on_parent_failure = 'cancel' THEN
        NEW.finished := now();
        NEW.success := false;
        NEW.cancel_requested_at := now();
        NEW.result := jsonb_build_object('error', format('Parent job %s failed', failed),
                                         'failed_parent', failed);
        RETURN NEW;
    END IF;
    NEW.waiting_on := cardinality(seen);
    IF NEW.waiting_on > 0 THEN
        NEW.due := '9999-01-01 00:00:00+00';
    END IF;
    RETURN NEW;
END;
$$;

-- Only rows that name parents or set the bookkeeping columns call it: a plain insert pays for
-- the WHEN test alone.
CREATE TRIGGER worker_jobs_depends_insert
    BEFORE INSERT ON worker_jobs
    FOR EACH ROW WHEN (NEW.depends_on IS NOT NULL OR NEW.waiting_on <> 0 OR NEW.has_dependents)
    EXECUTE FUNCTION qdworker_depends_insert();

-- A flagged row finished. If it was retried, its successor carries the flag (the finish
-- statement copies it) and nothing happens. Otherwise its chain ended: each unfinished
-- dependent that names a row of the chain is counted off (due now when it was the last), or,
-- when the chain failed and the dependent's on_parent_failure is 'cancel', cancelled with a
-- result naming the parent (which fires this trigger for its own dependents). Dependents are
-- locked in id order, and all of this runs under one advisory lock, so that batches of
-- finishing parents (several workers, several children) never deadlock each other.
CREATE FUNCTION qdworker_parent_finished() RETURNS trigger
LANGUAGE plpgsql
-- The dependents are found through worker_jobs_depends_idx, never by a scan of the table (on
-- a small table the planner's estimate picks a scan: 0.5 ms a parent at 10,000 rows).
SET enable_seqscan = off
AS $$
DECLARE
    chain bigint[];
    child record;
    named bigint;
    remaining integer;
    released integer := 0;
BEGIN
    IF NOT NEW.success
       AND EXISTS (SELECT 1 FROM worker_jobs WHERE rescheduled_from_job = NEW.id) THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(1902270662);
    WITH RECURSIVE links(id, prev) AS (
        SELECT NEW.id, NEW.rescheduled_from_job
        UNION ALL
        SELECT j.id, j.rescheduled_from_job
          FROM links AS l JOIN worker_jobs AS j ON j.id = l.prev
         WHERE NOT j.success
    )
    SELECT array_agg(id) INTO chain FROM links;
    FOR child IN SELECT j.id, j.on_parent_failure FROM worker_jobs AS j
                  WHERE j.depends_on && chain AND j.depends_on IS NOT NULL
                    AND j.finished IS NULL AND j.waiting_on > 0
                  ORDER BY j.id
                    FOR UPDATE LOOP
        IF NOT NEW.success AND child.on_parent_failure = 'cancel' THEN
            SELECT min(p) INTO named
              FROM worker_jobs AS j CROSS JOIN LATERAL unnest(j.depends_on) AS p
             WHERE j.id = child.id AND p = ANY(chain);
            UPDATE worker_jobs
               SET finished = now(), success = false, waiting_on = 0, updated_at = now(),
                   cancel_requested_at = now(),
                   result = jsonb_build_object('error', format('Parent job %s failed', named),
                                               'failed_parent', named)
             WHERE id = child.id;
        ELSE
            UPDATE worker_jobs
               SET waiting_on = waiting_on - 1, updated_at = now(),
                   due = CASE WHEN waiting_on = 1 THEN now() ELSE due END
             WHERE id = child.id
            RETURNING waiting_on INTO remaining;
            IF remaining = 0 THEN
                released := released + 1;
            END IF;
        END IF;
    END LOOP;
    IF released > 0 THEN
        PERFORM pg_notify('qdworker_jobs', 'dependencies');
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER worker_jobs_parent_finished
    AFTER UPDATE OF finished ON worker_jobs
    FOR EACH ROW WHEN (NEW.has_dependents AND OLD.finished IS NULL AND NEW.finished IS NOT NULL)
    EXECUTE FUNCTION qdworker_parent_finished();

-- The results of a dependent's parents, one row per id of depends_on: the final row of each
-- parent's retry chain (its id, success and result; NULL for a chain still open).
CREATE FUNCTION qdworker_parent_results(job_id bigint)
RETURNS TABLE (parent bigint, final_id bigint, success boolean, result jsonb)
LANGUAGE sql STABLE AS $$
    SELECT p, e.end_id, f.success, f.result
      FROM worker_jobs AS j
     CROSS JOIN LATERAL unnest(j.depends_on) AS p
     CROSS JOIN LATERAL qdworker_chain_end(p) AS e
      LEFT JOIN worker_jobs AS f ON f.id = e.end_id
     WHERE j.id = job_id
$$;

-- The limited queues' claims (0005) stop their scans before the jobs waiting on parents too
-- (the same bodies, with the run-order bound of the claim statement in sql/queries/worker.sql).
CREATE OR REPLACE FUNCTION qdworker_claim_in_order(
    p_queue text, p_owner text, p_types text[], p_limit integer,
    p_lease_seconds double precision, ts timestamptz
) RETURNS SETOF worker_jobs
LANGUAGE sql AS $$
    WITH picked AS (
        SELECT j.id FROM worker_jobs AS j
         WHERE j.queue = p_queue AND j.started IS NULL AND j.finished IS NULL
           AND j.due <= ts AND j.type = ANY(p_types)
           AND qdworker_run_order(j.due, j.priority) < '9000-01-01'::timestamp  -- 0012
         ORDER BY qdworker_run_order(j.due, j.priority), j.id
         LIMIT p_limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE worker_jobs AS j
       SET started = ts, claims = j.claims + 1, lease_owner = p_owner,
           lease_expires_at = ts + p_lease_seconds * interval '1 second', updated_at = ts
      FROM picked
     WHERE j.id = picked.id
    RETURNING j.*
$$;

CREATE OR REPLACE FUNCTION qdworker_claim_by_key(
    s worker_queues, p_owner text, p_types text[], p_limit integer,
    p_lease_seconds double precision, ts timestamptz
) RETURNS SETOF worker_jobs
LANGUAGE sql AS $$
    WITH RECURSIVE keys(k) AS (
        (SELECT concurrency_key FROM worker_jobs
          WHERE queue = s.name AND concurrency_key IS NOT NULL
            AND started IS NULL AND finished IS NULL
          ORDER BY concurrency_key LIMIT 1)
        UNION ALL
        SELECT (SELECT j.concurrency_key FROM worker_jobs AS j
                 WHERE j.queue = s.name AND j.concurrency_key > keys.k
                   AND j.started IS NULL AND j.finished IS NULL
                 ORDER BY j.concurrency_key LIMIT 1)
          FROM keys
         WHERE keys.k IS NOT NULL
    ), running AS (
        SELECT j.concurrency_key AS k, count(*)::integer AS n
          FROM worker_jobs AS j
         WHERE j.queue = s.name AND j.started IS NOT NULL AND j.finished IS NULL
         GROUP BY j.concurrency_key
    ), groups AS (
        SELECT g.k, coalesce(r.n, 0) AS n,
               CASE WHEN g.k IS NULL OR s.key_concurrency IS NULL THEN p_limit
                    ELSE greatest(0, least(p_limit, s.key_concurrency - coalesce(r.n, 0)))
               END AS room,
               coalesce((s.key_weights ->> g.k)::double precision, 1) AS weight
          FROM (SELECT k FROM keys WHERE k IS NOT NULL UNION ALL SELECT NULL) AS g
          LEFT JOIN running AS r ON r.k IS NOT DISTINCT FROM g.k
    ), candidates AS (
        SELECT c.id, c.run_order, g.n, g.weight,
               row_number() OVER (PARTITION BY g.k ORDER BY c.run_order, c.id) AS rank
          FROM groups AS g
         CROSS JOIN LATERAL (
            (SELECT j.id, qdworker_run_order(j.due, j.priority) AS run_order
               FROM worker_jobs AS j
              WHERE g.k IS NOT NULL AND j.queue = s.name AND j.concurrency_key = g.k
                AND j.started IS NULL AND j.finished IS NULL
                AND j.due <= ts AND j.type = ANY(p_types)
                AND qdworker_run_order(j.due, j.priority) < '9000-01-01'::timestamp  -- 0012
              ORDER BY qdworker_run_order(j.due, j.priority), j.id
              LIMIT g.room)
            UNION ALL
            (SELECT w.id, w.run_order
               FROM (SELECT j.id, qdworker_run_order(j.due, j.priority) AS run_order,
                            j.concurrency_key, j.due, j.type
                       FROM worker_jobs AS j
                      WHERE g.k IS NULL AND j.queue = s.name
                        AND j.started IS NULL AND j.finished IS NULL
                        AND qdworker_run_order(j.due, j.priority) < '9000-01-01'::timestamp
                      ORDER BY qdworker_run_order(j.due, j.priority), j.id
                      LIMIT 1000) AS w  -- NULL_KEY_WINDOW
              WHERE w.concurrency_key IS NULL AND w.due <= ts AND w.type = ANY(p_types)
              ORDER BY w.run_order, w.id
              LIMIT g.room)
         ) AS c
    ), chosen AS (
        SELECT id FROM candidates
         ORDER BY CASE WHEN s.fair THEN (n + rank) / weight END, run_order, id
         LIMIT p_limit
    ), picked AS (
        SELECT j.id FROM worker_jobs AS j
         WHERE j.id IN (SELECT id FROM chosen) AND j.started IS NULL AND j.finished IS NULL
           FOR UPDATE SKIP LOCKED
    )
    UPDATE worker_jobs AS j
       SET started = ts, claims = j.claims + 1, lease_owner = p_owner,
           lease_expires_at = ts + p_lease_seconds * interval '1 second', updated_at = ts
      FROM picked
     WHERE j.id = picked.id
    RETURNING j.*
$$;
