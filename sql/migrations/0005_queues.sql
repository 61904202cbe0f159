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
-- p that arrives after it. A UTC timestamp: arithmetic on timestamptz depends on the time
-- zone and is not immutable, and this form costs an index insert no more than a column does
-- (an inlined SQL function; the timestamptz form made inserts 15 % slower).
CREATE FUNCTION qdworker_run_order(due timestamptz, priority integer) RETURNS timestamp
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (due AT TIME ZONE 'UTC') - priority * interval '1 minute'
$$;

-- Claim path: pending rows of each queue in run order (a claimed row leaves this index).
-- It replaces the index of pending rows by due time; that one's other use, finding the next
-- due time, needs only the jobs scheduled for later (due after their insert), most jobs are
-- not, so it becomes a smaller index of those.
DROP INDEX worker_jobs_pending_idx;
CREATE INDEX worker_jobs_queue_pending_idx
    ON worker_jobs (queue, qdworker_run_order(due, priority), id)
 WHERE started IS NULL AND finished IS NULL;
CREATE INDEX worker_jobs_scheduled_idx
    ON worker_jobs (due)
 WHERE started IS NULL AND finished IS NULL AND due > created_at;
-- Running rows by queue and lease: what a limited queue's claim counts and rescues. It
-- replaces the index of running rows by lease alone (every claim and every lease renewal
-- writes an entry into each index of running rows): rescues across queues skip-scan it (one
-- descent per queue on Postgres 18; older servers read the running rows, as many as the
-- fleet runs at once).
DROP INDEX worker_jobs_running_idx;
CREATE INDEX worker_jobs_queue_running_idx
    ON worker_jobs (queue, lease_expires_at)
 WHERE started IS NOT NULL AND finished IS NULL;
-- Per-key claims (key limits, fair share): pending rows with a key, by queue and key.
CREATE INDEX worker_jobs_key_pending_idx
    ON worker_jobs (queue, concurrency_key, qdworker_run_order(due, priority), id)
 WHERE started IS NULL AND finished IS NULL AND concurrency_key IS NOT NULL;

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

-- The claim of one limited queue, up to p_limit jobs, correct across any number of workers:
-- claims of the queue are serialised by a transaction-scoped advisory lock, and everything
-- after the lock is read in statements of its own (a VOLATILE function's statements each take
-- a fresh snapshot under READ COMMITTED), so the running jobs and recent starts it counts
-- include every claim committed before it. Lost runs (lease expired) are rescued first when
-- p_rescue: they hold their slot already, so only the rate limit and p_limit bound them.
-- Then due pending jobs, at most `concurrency` minus the running ones, `rate_limit` minus the
-- starts in the last `rate_period_ms`, and per key `key_concurrency` minus the key's running
-- ones (jobs without a key have no per-key limit). With `fair`, the queue's capacity goes
-- round-robin to the keys with due work: each key's k-th next job scores (its running jobs +
-- k) / its weight (key_weights, default 1), lowest first, the older job first on a tie; a key
-- alone gets everything. Without it, run order decides. Rate-limited claims record their
-- starts (clock_timestamp() after the lock, also their `started`) in qdworker_queue_state.
CREATE FUNCTION qdworker_claim_queue(
    p_queue text, p_owner text, p_types text[], p_limit integer,
    p_lease_seconds double precision, p_rescue boolean
) RETURNS TABLE (job worker_jobs, lost boolean)
LANGUAGE plpgsql AS $$
DECLARE
    s worker_queues;
    ts timestamptz;
    window_starts timestamptz[] := '{}';
    cap integer := p_limit;
    rescued integer := 0;
    claimed integer := 0;
BEGIN
    PERFORM pg_advisory_xact_lock(1902270662, hashtext(p_queue));
    SELECT * INTO s FROM worker_queues AS w WHERE w.name = p_queue;
    IF NOT FOUND OR s.paused OR NOT qdworker_queue_is_limited(s) THEN
        RETURN;
    END IF;
    ts := clock_timestamp();
    IF s.rate_limit IS NOT NULL THEN
        SELECT coalesce(array_agg(t ORDER BY t), '{}') INTO window_starts
          FROM qdworker_queue_state AS st, unnest(st.starts) AS t
         WHERE st.queue = p_queue AND t > ts - s.rate_period_ms * interval '1 millisecond';
        cap := least(cap, s.rate_limit - cardinality(window_starts));
    END IF;
    IF cap <= 0 THEN
        RETURN;
    END IF;

    IF p_rescue THEN
        RETURN QUERY
        WITH picked AS (
            SELECT j.id FROM worker_jobs AS j
             WHERE j.queue = p_queue AND j.started IS NOT NULL AND j.finished IS NULL
               AND (j.lease_expires_at IS NULL OR j.lease_expires_at < ts)
               AND j.lease_owner IS DISTINCT FROM p_owner AND j.type = ANY(p_types)
             ORDER BY j.lease_expires_at NULLS FIRST
             LIMIT cap
               FOR UPDATE SKIP LOCKED
        )
        UPDATE worker_jobs AS j
           SET started = ts, claims = j.claims + 1, attempt = j.attempt + 1,
               lost_runs = j.lost_runs + 1, lease_owner = p_owner,
               lease_expires_at = ts + p_lease_seconds * interval '1 second', updated_at = ts
          FROM picked
         WHERE j.id = picked.id
        RETURNING j, true;
        GET DIAGNOSTICS rescued = ROW_COUNT;
    END IF;

    cap := cap - rescued;
    IF s.concurrency IS NOT NULL THEN
        cap := least(cap, s.concurrency - (
            SELECT count(*) FROM worker_jobs AS j
             WHERE j.queue = p_queue AND j.started IS NOT NULL AND j.finished IS NULL));
    END IF;
    IF cap > 0 THEN
        IF s.key_concurrency IS NULL AND NOT s.fair THEN
            RETURN QUERY SELECT c, false
                           FROM qdworker_claim_in_order(p_queue, p_owner, p_types, cap,
                                                        p_lease_seconds, ts) AS c;
        ELSE
            RETURN QUERY SELECT c, false
                           FROM qdworker_claim_by_key(s, p_owner, p_types, cap,
                                                      p_lease_seconds, ts) AS c;
        END IF;
        GET DIAGNOSTICS claimed = ROW_COUNT;
    END IF;

    IF s.rate_limit IS NOT NULL AND rescued + claimed > 0 THEN
        INSERT INTO qdworker_queue_state AS st (queue, starts)
        VALUES (p_queue, window_starts || array_fill(ts, ARRAY[rescued + claimed]))
        ON CONFLICT (queue) DO UPDATE SET starts = excluded.starts;
    END IF;
END;
$$;

-- Due pending jobs of a queue in run order (no per-key rule), claimed at `ts`.
CREATE FUNCTION qdworker_claim_in_order(
    p_queue text, p_owner text, p_types text[], p_limit integer,
    p_lease_seconds double precision, ts timestamptz
) RETURNS SETOF worker_jobs
LANGUAGE sql AS $$
    WITH picked AS (
        SELECT j.id FROM worker_jobs AS j
         WHERE j.queue = p_queue AND j.started IS NULL AND j.finished IS NULL
           AND j.due <= ts AND j.type = ANY(p_types)
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

-- Due pending jobs of a queue by key (per-key limits, fair share; see qdworker_claim_queue),
-- claimed at `ts`. The keys with pending jobs are found by a loose index scan, and each key's
-- next jobs read without locks (the queue's claims hold its advisory lock, so no other claim
-- takes them meanwhile); only the jobs chosen are locked. Jobs without a key form one more
-- group, looked for among the queue's first NULL_KEY_WINDOW (1,000) pending jobs in run order
-- (no index holds them apart from the others: the default path pays for no extra index).
CREATE FUNCTION qdworker_claim_by_key(
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
              ORDER BY qdworker_run_order(j.due, j.priority), j.id
              LIMIT g.room)
            UNION ALL
            (SELECT w.id, w.run_order
               FROM (SELECT j.id, qdworker_run_order(j.due, j.priority) AS run_order,
                            j.concurrency_key, j.due, j.type
                       FROM worker_jobs AS j
                      WHERE g.k IS NULL AND j.queue = s.name
                        AND j.started IS NULL AND j.finished IS NULL
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

-- All limited, unpaused queues the worker serves (p_queues; NULL: all) with work to start,
-- one after another in name order (their locks are taken in that order: no deadlock), up to
-- p_limit jobs in all.
CREATE FUNCTION qdworker_claim_limited(
    p_owner text, p_types text[], p_queues text[], p_limit integer,
    p_lease_seconds double precision, p_rescue boolean
) RETURNS TABLE (job worker_jobs, lost boolean)
LANGUAGE plpgsql AS $$
DECLARE
    q text;
    room integer := p_limit;
    took integer;
BEGIN
    FOR q IN
        SELECT w.name FROM worker_queues AS w
         WHERE qdworker_queue_is_limited(w) AND NOT w.paused
           AND (p_queues IS NULL OR w.name = ANY(p_queues))
           AND (EXISTS (SELECT 1 FROM worker_jobs AS j
                         WHERE j.queue = w.name AND j.started IS NULL AND j.finished IS NULL
                           AND j.due <= now() AND j.type = ANY(p_types))
                OR (p_rescue AND EXISTS (
                        SELECT 1 FROM worker_jobs AS j
                         WHERE j.queue = w.name AND j.started IS NOT NULL
                           AND j.finished IS NULL AND j.lease_expires_at < now()
                           AND j.type = ANY(p_types))))
         ORDER BY w.name
    LOOP
        EXIT WHEN room <= 0;
        RETURN QUERY SELECT c.job, c.lost
                       FROM qdworker_claim_queue(q, p_owner, p_types, room, p_lease_seconds,
                                                 p_rescue) AS c;
        GET DIAGNOSTICS took = ROW_COUNT;
        room := room - took;
    END LOOP;
END;
$$;
