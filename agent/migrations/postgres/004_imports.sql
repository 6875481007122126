-- Resumable bulk imports: how far each file (by its SHA-256) was committed, updated in each batch's transaction.
CREATE TABLE IF NOT EXISTS optout_imports (
    file_sha256 text PRIMARY KEY,
    file_name   text NOT NULL,
    last_line   bigint NOT NULL DEFAULT 0,
    added       bigint NOT NULL DEFAULT 0,
    bad         bigint NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
