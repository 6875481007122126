-- Push for the cache keepers: every statement that appends to the audit trail (a write, a removal, an import's
-- COPY, from any process) notifies `optout_changes` when it commits; keepers LISTEN and apply at once.
CREATE OR REPLACE FUNCTION optout_actions_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('optout_changes', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS optout_actions_notify ON optout_actions;
CREATE TRIGGER optout_actions_notify AFTER INSERT ON optout_actions
    FOR EACH STATEMENT EXECUTE FUNCTION optout_actions_notify();
