-- The same schema as PostgreSQL's, in SQLite types (timestamps as ISO-8601 text, JSON as text).
CREATE TABLE IF NOT EXISTS blacklist (
    phone_number TEXT PRIMARY KEY,
    added_at     TEXT NOT NULL,
    reason       TEXT NOT NULL,
    source       TEXT NOT NULL CHECK (source IN ('user_optout', 'admin_import', 'compliance')),
    metadata     TEXT
);

CREATE TABLE IF NOT EXISTS optout_actions (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id            TEXT NOT NULL UNIQUE,
    phone_number        TEXT,
    raw_number          TEXT,
    call_id             TEXT,
    campaign_id         TEXT,
    contact_id          TEXT,
    origin              TEXT NOT NULL CHECK (origin IN ('ari', 'agi', 'ami', 'sns', 'admin')),
    source              TEXT,
    digit               TEXT,
    pressed_at          TEXT,
    received_at         TEXT NOT NULL,
    hangup_requested_at TEXT,
    hungup_at           TEXT,
    hangup_method       TEXT,
    hangup_result       TEXT,
    outcome             TEXT NOT NULL,
    actor               TEXT,
    reason              TEXT,
    channel             TEXT,
    recorded_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
CREATE INDEX IF NOT EXISTS optout_actions_phone ON optout_actions (phone_number, id);
CREATE INDEX IF NOT EXISTS optout_actions_campaign ON optout_actions (campaign_id, id);

CREATE TABLE IF NOT EXISTS campaign_optouts (
    campaign_id    TEXT PRIMARY KEY,
    optouts        INTEGER NOT NULL DEFAULT 0,
    last_optout_at TEXT
);

CREATE TRIGGER IF NOT EXISTS optout_actions_no_update BEFORE UPDATE ON optout_actions
BEGIN
    SELECT RAISE(ABORT, 'optout_actions is append-only: UPDATE refused');
END;
CREATE TRIGGER IF NOT EXISTS optout_actions_no_delete BEFORE DELETE ON optout_actions
BEGIN
    SELECT RAISE(ABORT, 'optout_actions is append-only: DELETE refused');
END;
