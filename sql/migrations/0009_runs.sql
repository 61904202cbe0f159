-- qdworker 0009: what each run cost and how it ended, and the trace it belongs to.
-- Released migrations are never edited: add a new numbered file instead.
--
-- The run_* columns describe the row's last run that ended (a row runs more than once when a
-- run is lost with its worker or given back at shutdown; a retry is a new row, so every
-- attempt keeps its own figures). NULL while the row has not run yet, and for rows finished
-- without running (unknown type, invalid cron schedule, lost too often). The worker writes
-- them with the outcome, in the finish statement; the supervisor and the rescuing claim write
-- 'lost'. See README.rst, "Run figures" and "Tracing".
ALTER TABLE worker_jobs
    -- returned: the handler returned (success says whether the result was stored); raised;
    -- timed_out; preempted: given back (worker shutdown, or a lease it could not renew);
    -- cancelled; lost: the worker process died while it ran (lost_signal says how).
    ADD COLUMN run_outcome        text
        CONSTRAINT worker_jobs_run_outcome_check
        CHECK (run_outcome IN ('returned', 'raised', 'timed_out', 'preempted', 'cancelled',
                               'lost')),
    ADD COLUMN run_wall_ms        double precision,  -- handler start to end (monotonic clock)
    -- CPU time of the whole worker process over the run (user + system, every thread,
    -- the worker's own bookkeeping included): exact for a run alone in its process, an upper
    -- bound when run_cpu_shared (other runs of the process overlapped it).
    ADD COLUMN run_cpu_ms         double precision,
    ADD COLUMN run_cpu_shared     boolean,
    -- The highest resident set size of the worker process seen while the run went on
    -- (sampled; exact when the process reached a new lifetime peak during the run).
    ADD COLUMN run_peak_rss_bytes bigint,
    -- The signal that killed the worker process during this row's last lost run, as its
    -- supervisor saw it ('SIGKILL'); NULL: no run lost, or lost without a signal (an exit
    -- code, or a lease that expired with nobody watching).
    ADD COLUMN lost_signal        text,
    -- W3C trace context of the submitter ({"traceparent": ..., "tracestate": ...}; a retry
    -- copies it and adds "previous", the traceparent of the attempt before; a cron tick has
    -- only "previous"). NULL: submitted outside any trace, or by plain SQL.
    ADD COLUMN trace_context      jsonb,
    -- The traceparent of the run's own span (NULL: no tracing in the worker).
    ADD COLUMN run_traceparent    text;

-- The rescue of a lost run of a limited queue records it, as the claim statement does (the
-- function of 0005 with the run_* columns set in the rescuing UPDATE).
CREATE OR REPLACE FUNCTION qdworker_claim_queue(
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
               lease_expires_at = ts + p_lease_seconds * interval '1 second', updated_at = ts,
               -- The run lost: as its supervisor saw it die (release_worker_leases ends the
               -- lease at its last update), or by lease expiry (nothing known of it).
               run_outcome = 'lost',
               lost_signal = CASE WHEN j.run_outcome = 'lost'
                                       AND j.lease_expires_at = j.updated_at
                                  THEN j.lost_signal END,
               run_wall_ms = CASE WHEN j.run_outcome = 'lost'
                                       AND j.lease_expires_at = j.updated_at
                                  THEN j.run_wall_ms END,
               run_cpu_ms = NULL, run_cpu_shared = NULL, run_peak_rss_bytes = NULL,
               run_traceparent = NULL
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
