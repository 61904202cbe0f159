-- The web3 part (qdworker.web3): chain progress in qdworker_settings, filter savepoints,
-- deployMulticall3 submission.

-- name: web3_progress_pin
-- First run: record where watching starts (committed on its own; not progress).
INSERT INTO qdworker_settings (key, value) VALUES (%(key)s, %(value)s)
ON CONFLICT (key) DO NOTHING

-- name: web3_progress_lock
-- Inside a range's transaction: the last processed block, locked until commit, so two runs
-- can never process the same range (the second waits, then sees the first's progress).
SELECT value FROM qdworker_settings WHERE key = %(key)s FOR UPDATE

-- name: web3_progress_set
UPDATE qdworker_settings SET value = %(value)s, updated_at = now() WHERE key = %(key)s

-- name: web3_savepoint
-- One fixed name: Postgres stacks same-named savepoints, so nesting works.
SAVEPOINT qdworker_web3_filter

-- name: web3_savepoint_rollback
ROLLBACK TO SAVEPOINT qdworker_web3_filter

-- name: web3_savepoint_release
RELEASE SAVEPOINT qdworker_web3_filter

-- name: web3_submit_deploy_multicall3
-- At supervisor start (QuickDapp's tag and data); the tag rule replaces a pending one.
INSERT INTO worker_jobs (tag, type, user_id, data, auto_reschedule_on_failure,
                         auto_reschedule_on_failure_delay, max_attempts)
VALUES ('deploy-multicall3', 'deployMulticall3', 0, '{"forceRedeploy": false}'::jsonb, true,
        %(retry_delay_ms)s, %(max_attempts)s)
RETURNING id

-- name: web3_progress_get
SELECT value FROM qdworker_settings WHERE key = %(key)s
