-- qdworker 0003: events between supervisors, and user notifications from plain SQL.
-- Released migrations are never edited: add a new numbered file instead.
--
-- Channel `qdworker_events`. Every payload is the text of a JSON object, always shorter than
-- Postgres's 8000-byte NOTIFY limit:
--   {"origin": "<sender>", "seq": <n>, "messages": [<message>, ...]}   inline
--   {"origin": "<sender>", "ref": <worker_events.id>}                  body (the inline form)
--                                                                       stored in worker_events
--   {"origin": "<supervisor id>", "presence": <ws clients> | null}      a supervisor's websocket
--                                                                       client count; null: it left
-- A <message> is one of the kinds the supervisor's events hub routes (as in worker IPC):
--   {"kind": "send-to-user", "user_id": 42, "message": {"type": ..., "data": ...}}
--   {"kind": "broadcast", "message": {"type": ..., "data": ...}}
--   {"kind": "job-events", "events": [{"event": "succeeded", "id": 1, "user_id": 42, ...}, ...]}
-- Origin "sql" is qdworker_notify_user / qdworker_broadcast. Each supervisor skips its own
-- payloads and hands the others' messages to its websocket clients. Delivery is best-effort:
-- a client that is not connected misses the message.
--
-- From any app or language:
--   SELECT qdworker_notify_user(42, '{"type": "hello", "data": {}}');
--   SELECT qdworker_broadcast('{"type": "maintenance", "data": {"in": 300}}');
-- Notifications are sent at commit, like every NOTIFY.

-- Bodies too large for a NOTIFY payload, read by reference. Kept a few minutes: supervisors
-- delete old rows in bounded batches.
CREATE TABLE worker_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    origin      text        NOT NULL,
    body        jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE worker_events IS 'qdworker: event payloads over the NOTIFY limit, sent on channel qdworker_events as {"ref": id}; removed after a few minutes.';

CREATE INDEX worker_events_created_at_idx ON worker_events (created_at);

-- Live supervisors and their websocket client counts: a supervisor forwards job events to the
-- others only when one of them has clients. Rows are refreshed every few seconds and deleted on
-- a clean exit; stale rows are ignored and eventually deleted.
CREATE TABLE qdworker_supervisors (
    id          text        PRIMARY KEY,
    host        text        NOT NULL,
    pid         integer     NOT NULL,
    ws_clients  integer     NOT NULL DEFAULT 0,
    seen_at     timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT qdworker_supervisors_ws_clients_check CHECK (ws_clients >= 0)
);

COMMENT ON TABLE qdworker_supervisors IS 'qdworker: live supervisors (presence for the events relay).';

-- Unique per payload: Postgres folds identical payloads sent in one transaction into one.
CREATE SEQUENCE qdworker_events_seq;

-- Send payloads (each the text of a JSON object) on qdworker_events, in order. A payload of
-- 8000 bytes or more is stored in worker_events and sent as {"origin": ..., "ref": id}.
-- Returns how many went by reference. Raises 54000 for a payload over 1 MiB.
CREATE FUNCTION qdworker_publish(sender text, payloads text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    p text;
    ref_id bigint;
    refs integer := 0;
BEGIN
    FOREACH p IN ARRAY coalesce(payloads, ARRAY[]::text[]) LOOP
        IF octet_length(p) < 8000 THEN
            PERFORM pg_notify('qdworker_events', p);
        ELSIF octet_length(p) > 1048576 THEN
            RAISE EXCEPTION 'qdworker_publish: payload of % bytes exceeds 1048576 bytes', octet_length(p)
                USING ERRCODE = '54000';
        ELSE
            INSERT INTO worker_events (origin, body) VALUES (sender, p::jsonb) RETURNING id INTO ref_id;
            PERFORM pg_notify('qdworker_events',
                              json_build_object('origin', sender, 'ref', ref_id)::text);
            refs := refs + 1;
        END IF;
    END LOOP;
    RETURN refs;
END;
$$;

-- The checks shared by qdworker_notify_user and qdworker_broadcast: a JSON object of at most
-- 64 KiB (its text). Raises 22023 (invalid_parameter_value) or 54000 (program_limit_exceeded).
CREATE FUNCTION qdworker_check_message(fn text, message jsonb) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF message IS NULL OR jsonb_typeof(message) <> 'object' THEN
        RAISE EXCEPTION '%: message must be a JSON object, got %', fn,
                        coalesce(jsonb_typeof(message), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'for example ''{"type": "hello", "data": {}}''';
    END IF;
    IF octet_length(message::text) > 65536 THEN
        RAISE EXCEPTION '%: message is % bytes, more than the maximum of 65536 bytes', fn,
                        octet_length(message::text)
            USING ERRCODE = '54000',
                  HINT = 'send a reference (an id the client can fetch) instead of the data';
    END IF;
END;
$$;

-- Notify user_id's websocket clients (and admin clients) on every supervisor.
CREATE FUNCTION qdworker_notify_user(user_id bigint, message jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF user_id IS NULL OR user_id < 0 THEN
        RAISE EXCEPTION 'qdworker_notify_user: user_id must be a non-negative integer, got %',
                        coalesce(user_id::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    PERFORM qdworker_check_message('qdworker_notify_user', message);
    PERFORM qdworker_publish('sql', ARRAY[jsonb_build_object(
        'origin', 'sql', 'seq', nextval('qdworker_events_seq'),
        'messages', jsonb_build_array(jsonb_build_object(
            'kind', 'send-to-user', 'user_id', user_id, 'message', message)))::text]);
END;
$$;

-- Send message to every websocket client on every supervisor.
CREATE FUNCTION qdworker_broadcast(message jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM qdworker_check_message('qdworker_broadcast', message);
    PERFORM qdworker_publish('sql', ARRAY[jsonb_build_object(
        'origin', 'sql', 'seq', nextval('qdworker_events_seq'),
        'messages', jsonb_build_array(jsonb_build_object(
            'kind', 'broadcast', 'message', message)))::text]);
END;
$$;
