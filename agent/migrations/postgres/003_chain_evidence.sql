-- The tamper-evident chain, honour-time evidence and producer ids on the audit trail.
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS source_event_id text;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS number_source text;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS journaled_at timestamptz;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS visible_at timestamptz;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS prev_hash text;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS row_hash text;
ALTER TABLE optout_actions ALTER COLUMN recorded_at SET DEFAULT clock_timestamp();

-- When the cache made an opt-out visible to the dialers, where its writer could not (Redis was down then).
CREATE TABLE IF NOT EXISTS optout_visibility (
    event_id    text PRIMARY KEY,
    visible_at  timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
DROP TRIGGER IF EXISTS optout_visibility_no_change ON optout_visibility;
CREATE TRIGGER optout_visibility_no_change BEFORE UPDATE OR DELETE ON optout_visibility
    FOR EACH ROW EXECUTE FUNCTION optout_actions_append_only();
