-- The example app's tables (QuickDapp keeps the same data in userAuth and notifications):
-- which user owns a wallet, and the notifications the chain filters create.
CREATE TABLE IF NOT EXISTS app_user_wallets (
    wallet   text   PRIMARY KEY CHECK (wallet = lower(wallet)),   -- 0x…, lower case
    user_id  bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS app_notifications (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     bigint      NOT NULL,
    data        jsonb       NOT NULL,
    read        boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now()
);
