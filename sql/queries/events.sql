-- The events relay (qdworker/_events/relay.py): events between supervisors through Postgres.
-- Channel, payload forms and SQL functions: sql/migrations/0003_events.sql.

-- name: events_listen
LISTEN qdworker_events

-- name: events_publish
-- Send a batch of payloads in order; returns how many went by reference.
SELECT qdworker_publish(%(origin)s, %(payloads)s::text[]) AS refs

-- name: events_fetch
-- The body of a payload sent by reference (gone once cleaned up).
SELECT body::text AS body FROM worker_events WHERE id = %(id)s

-- name: events_presence
-- This supervisor is alive with %(ws_clients)s websocket clients; tell the others at once.
WITH up AS (
    INSERT INTO qdworker_supervisors AS s (id, host, pid, ws_clients, seen_at)
    VALUES (%(id)s, %(host)s, %(pid)s, %(ws_clients)s, now())
    ON CONFLICT (id) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, ws_clients = excluded.ws_clients,
           seen_at = excluded.seen_at
    RETURNING s.id
)
SELECT pg_notify('qdworker_events',
                 json_build_object('origin', %(id)s::text, 'presence', %(ws_clients)s::int)::text)
  FROM up

-- name: events_peers
-- The other supervisors seen within %(live_seconds)s seconds, and how long ago.
SELECT id, ws_clients, extract(epoch FROM now() - seen_at)::float8 AS age_seconds
  FROM qdworker_supervisors
 WHERE id <> %(id)s
   AND seen_at > now() - %(live_seconds)s::float8 * interval '1 second'

-- name: events_leave
-- Clean exit: forget this supervisor and tell the others.
WITH gone AS (DELETE FROM qdworker_supervisors WHERE id = %(id)s)
SELECT pg_notify('qdworker_events', json_build_object('origin', %(id)s::text, 'presence', NULL)::text)

-- name: events_cleanup
-- Delete up to %(limit)s bodies older than %(retention_seconds)s seconds, and supervisors
-- not seen for %(stale_seconds)s seconds; rows another supervisor is deleting are skipped.
WITH old_events AS (
    SELECT id FROM worker_events
     WHERE created_at < now() - %(retention_seconds)s::float8 * interval '1 second'
     ORDER BY created_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), deleted_events AS (
    DELETE FROM worker_events e USING old_events o WHERE e.id = o.id RETURNING 1
), stale AS (
    SELECT id FROM qdworker_supervisors
     WHERE seen_at < now() - %(stale_seconds)s::float8 * interval '1 second'
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED
), deleted_stale AS (
    DELETE FROM qdworker_supervisors s USING stale t WHERE s.id = t.id RETURNING 1
)
SELECT (SELECT count(*) FROM deleted_events) AS events,
       (SELECT count(*) FROM deleted_stale) AS supervisors
