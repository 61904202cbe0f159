-- qdworker 0002: a small key/value settings table (QuickDapp's `settings`, prefixed so it
-- never collides with an app's own table). The web3 part keeps chain progress here under
-- `chain_last_processed_block_<chain>`. Released migrations are never edited.

CREATE TABLE qdworker_settings (
    key         text        PRIMARY KEY,
    value       text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT qdworker_settings_key_check CHECK (length(btrim(key)) BETWEEN 1 AND 255)
);

COMMENT ON TABLE qdworker_settings IS 'qdworker key/value settings (e.g. chain_last_processed_block_<chain>).';
