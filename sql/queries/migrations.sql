-- name: migrations_lock
SELECT pg_advisory_lock(%(key)s)

-- name: migrations_unlock
SELECT pg_advisory_unlock(%(key)s)

-- name: migrations_table
CREATE TABLE IF NOT EXISTS qdworker_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- name: migrations_applied
SELECT version, name FROM qdworker_migrations ORDER BY version

-- name: migrations_record
INSERT INTO qdworker_migrations (version, name) VALUES (%(version)s, %(name)s)
