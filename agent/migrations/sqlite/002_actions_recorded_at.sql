-- Cache reconciliation re-reads the numbers whose actions were recorded while it rebuilt the Redis set.
CREATE INDEX IF NOT EXISTS optout_actions_recorded_at ON optout_actions (recorded_at);
