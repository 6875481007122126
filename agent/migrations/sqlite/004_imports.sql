-- Resumable bulk imports: how far each file (by its SHA-256) was committed, updated in each batch's transaction.
CREATE TABLE IF NOT EXISTS optout_imports (
    file_sha256 TEXT PRIMARY KEY,
    file_name   TEXT NOT NULL,
    last_line   INTEGER NOT NULL DEFAULT 0,
    added       INTEGER NOT NULL DEFAULT 0,
    bad         INTEGER NOT NULL DEFAULT 0,
    started_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    updated_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%f+00:00', 'now')),
    finished_at TEXT
);
