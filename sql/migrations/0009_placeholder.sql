-- qdworker 0009: a placeholder on branch issue14-metrics only. Migration 0009 belongs to the
-- OpenTelemetry / per-run resources work (issue14-runs); this branch's own migration is 0010,
-- and migrations must be numbered without gaps. DELETE THIS FILE when merging: that branch
-- brings the real 0009.
SELECT 1;
