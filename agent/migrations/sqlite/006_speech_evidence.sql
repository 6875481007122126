-- Spoken opt-outs (agent/speech): what the callee said, on the audit row. Hashed only when set (agent/audit.py).
ALTER TABLE optout_actions ADD COLUMN speech_transcript TEXT;
ALTER TABLE optout_actions ADD COLUMN speech_score TEXT;
ALTER TABLE optout_actions ADD COLUMN speech_phrase TEXT;
ALTER TABLE optout_actions ADD COLUMN speech_audio_sha256 TEXT;
-- Origin 'speech' joins the CHECK. SQLite cannot alter a constraint; its documented way for a change that
-- leaves the stored rows as they are is to edit the table's SQL in the schema (no copy, so no column another
-- migration added is lost and every row keeps its id and hash). The index after it is a real schema change,
-- which makes every open connection reload the schema.
PRAGMA writable_schema = ON;
UPDATE sqlite_master SET sql = replace(sql, 'CHECK (origin IN (''ari'', ''agi'', ''ami'', ''sns'', ''admin''))',
    'CHECK (origin IN (''ari'', ''agi'', ''ami'', ''sns'', ''admin'', ''speech''))')
    WHERE type = 'table' AND name = 'optout_actions';
PRAGMA writable_schema = RESET;
CREATE INDEX IF NOT EXISTS optout_actions_origin ON optout_actions (origin, id);
