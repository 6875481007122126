-- The tamper-evident chain, honour-time evidence and producer ids on the audit trail.
ALTER TABLE optout_actions ADD COLUMN source_event_id TEXT;
ALTER TABLE optout_actions ADD COLUMN number_source TEXT;
ALTER TABLE optout_actions ADD COLUMN journaled_at TEXT;
ALTER TABLE optout_actions ADD COLUMN visible_at TEXT;
ALTER TABLE optout_actions ADD COLUMN prev_hash TEXT;
ALTER TABLE optout_actions ADD COLUMN row_hash TEXT;

CREATE TABLE IF NOT EXISTS optout_visibility (
    event_id    TEXT PRIMARY KEY,
    visible_at  TEXT NOT NULL,
    recorded_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now'))
);
CREATE TRIGGER IF NOT EXISTS optout_visibility_no_update BEFORE UPDATE ON optout_visibility
BEGIN
    SELECT RAISE(ABORT, 'optout_visibility is append-only: UPDATE refused');
END;
CREATE TRIGGER IF NOT EXISTS optout_visibility_no_delete BEFORE DELETE ON optout_visibility
BEGIN
    SELECT RAISE(ABORT, 'optout_visibility is append-only: DELETE refused');
END;
