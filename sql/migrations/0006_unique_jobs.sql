-- qdworker 0006: unique jobs. An insert may keep the unfinished job of its tag instead of
-- replacing it: on_tag_conflict = 'keep'. QuickDapp's rule ('replace') stays the default.
-- Released migrations are never edited: add a new numbered file instead.

ALTER TABLE worker_jobs
    ADD COLUMN on_tag_conflict text NOT NULL DEFAULT 'replace',
    ADD CONSTRAINT worker_jobs_on_tag_conflict_check
        CHECK (on_tag_conflict IN ('replace', 'keep'));

-- Keep mode looks for an unfinished row of the tag: pending rows through
-- worker_jobs_pending_tag_idx, running rows through this one. Without it the running half is
-- a walk over every running row (filtered by tag), made under the
-- tag's lock and growing with the fleet's concurrency (5,000 running rows: 0.5 ms a check);
-- with it, one probe (0.01 ms). It costs one small entry per claim, none per insert.
CREATE INDEX worker_jobs_running_tag_idx ON worker_jobs (tag)
 WHERE started IS NOT NULL AND finished IS NULL;

-- The 0004 trigger plus keep mode. A keep-mode insert of a tag that has a pending or running
-- row is skipped (RETURN NULL: no row, nothing in RETURNING, no replacement); one that finds
-- none is inserted, and there is nothing to replace. Retries and cron successors
-- (rescheduled_from_job set) are never skipped, whatever their mode: they continue a chain
-- whose row just finished, and follow QuickDapp's rule.
--
-- Race-free under READ COMMITTED: the check runs after the tag's advisory lock is granted, in
-- a statement of its own. Each statement of a VOLATILE plpgsql function takes a fresh
-- snapshot, and the previous holder of the lock committed (its row became visible) before the
-- lock was released, so the check sees that row. Concurrent keep-mode inserts of one tag thus
-- leave exactly one unfinished row. Rows inserted earlier by the same statement are visible
-- too, so of several keep-mode rows of one tag in one INSERT only the first is inserted.
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
        -- A tag of its own replaces nothing and conflicts with nothing: no lock, no search.
        NEW.tag := 'job:' || NEW.id;
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(1902270661, hashtext(NEW.tag));
    IF NEW.on_tag_conflict = 'keep' AND NEW.rescheduled_from_job IS NULL THEN
        -- Two lookups, so each half uses its partial index.
        IF EXISTS (SELECT 1 FROM worker_jobs
                    WHERE tag = NEW.tag AND started IS NULL AND finished IS NULL)
           OR EXISTS (SELECT 1 FROM worker_jobs
                       WHERE tag = NEW.tag AND started IS NOT NULL AND finished IS NULL) THEN
            RETURN NULL;
        END IF;
        RETURN NEW;
    END IF;
    UPDATE worker_jobs
       SET finished = now(), success = false, updated_at = now(), cancel_requested_at = now(),
           result = '{"error": "Job cancelled due to new job being created"}'::jsonb
     WHERE tag = NEW.tag AND started IS NULL AND finished IS NULL;
    RETURN NEW;
END;
$$;
