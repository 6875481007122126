-- Spoken opt-outs (agent/speech): what the callee said, on the audit row. Hashed only when set (agent/audit.py).
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS speech_transcript text;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS speech_score text;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS speech_phrase text;
ALTER TABLE optout_actions ADD COLUMN IF NOT EXISTS speech_audio_sha256 text;
ALTER TABLE optout_actions DROP CONSTRAINT IF EXISTS optout_actions_origin_check;
ALTER TABLE optout_actions ADD CONSTRAINT optout_actions_origin_check
    CHECK (origin IN ('ari', 'agi', 'ami', 'sns', 'admin', 'speech'));
