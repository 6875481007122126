-- The blacklist (system of record), the append-only audit trail and per-campaign counts.
CREATE TABLE IF NOT EXISTS blacklist (
    phone_number text PRIMARY KEY,
    added_at     timestamptz NOT NULL,
    reason       text NOT NULL,
    source       text NOT NULL CHECK (source IN ('user_optout', 'admin_import', 'compliance')),
    metadata     jsonb
);

CREATE TABLE IF NOT EXISTS optout_actions (
    id                  bigserial PRIMARY KEY,
    event_id            text NOT NULL UNIQUE,
    phone_number        text,
    raw_number          text,
    call_id             text,
    campaign_id         text,
    contact_id          text,
    origin              text NOT NULL CHECK (origin IN ('ari', 'agi', 'ami', 'sns', 'admin')),
    source              text,
    digit               text,
    pressed_at          timestamptz,
    received_at         timestamptz NOT NULL,
    hangup_requested_at timestamptz,
    hungup_at           timestamptz,
    hangup_method       text,
    hangup_result       text,
    outcome             text NOT NULL,
    actor               text,
    reason              text,
    channel             jsonb,
    recorded_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS optout_actions_phone ON optout_actions (phone_number, id);
CREATE INDEX IF NOT EXISTS optout_actions_campaign ON optout_actions (campaign_id, id);

CREATE TABLE IF NOT EXISTS campaign_optouts (
    campaign_id    text PRIMARY KEY,
    optouts        bigint NOT NULL DEFAULT 0,
    last_optout_at timestamptz
);

-- The audit trail is append-only: UPDATE, DELETE and TRUNCATE are refused for every role.
CREATE OR REPLACE FUNCTION optout_actions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'optout_actions is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
DROP TRIGGER IF EXISTS optout_actions_no_change ON optout_actions;
CREATE TRIGGER optout_actions_no_change BEFORE UPDATE OR DELETE ON optout_actions
    FOR EACH ROW EXECUTE FUNCTION optout_actions_append_only();
DROP TRIGGER IF EXISTS optout_actions_no_truncate ON optout_actions;
CREATE TRIGGER optout_actions_no_truncate BEFORE TRUNCATE ON optout_actions
    FOR EACH STATEMENT EXECUTE FUNCTION optout_actions_append_only();
