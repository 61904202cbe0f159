-- The progress handlers report (ctx.progress): see qdworker/_worker/progress.py and
-- sql/migrations/0012_progress.sql.

-- name: write_progress
-- The latest progress of a batch of runs, each fenced by its claim: written only while the run
-- %(claims)s still holds the row (this worker's lease, not finished). updated_at is left alone
-- (the claim reads it to tell lost runs). Returns the ids written.
UPDATE worker_jobs AS j
   SET progress = p.progress
  FROM ROWS FROM (unnest(%(ids)s::bigint[]), unnest(%(claims)s::integer[]),
                  jsonb_array_elements(%(values)s::jsonb)) AS p(id, claims, progress)
 WHERE j.id = p.id AND j.claims = p.claims AND j.lease_owner = %(owner)s
   AND j.started IS NOT NULL AND j.finished IS NULL
RETURNING j.id
