-- sftd schema on PostgreSQL: the same tables and columns as the SQLite migrations up to
-- 0003_leases, with BIGINT for every integer and a creation-order column on files.

CREATE TABLE files (
    n           BIGSERIAL UNIQUE,                -- registration order (list order)
    id          TEXT PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,
    bytes       BIGINT NOT NULL,
    path        TEXT NOT NULL,
    rows        BIGINT,
    job_id      TEXT
);
CREATE INDEX files_job ON files(job_id);

CREATE TABLE jobs (
    n               BIGSERIAL PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    created_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT,
    model           TEXT NOT NULL,
    training_file   TEXT NOT NULL,
    validation_file TEXT,
    status          TEXT NOT NULL,
    spec            TEXT NOT NULL,
    config          TEXT NOT NULL,
    seed            BIGINT NOT NULL,
    suffix          TEXT,
    metadata        TEXT,
    fine_tuned_model TEXT,
    trained_tokens  BIGINT,
    estimated_finish BIGINT,
    error_code      TEXT,
    error_message   TEXT,
    error_param     TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    idempotency_key TEXT UNIQUE,
    estimated_peak_memory_bytes BIGINT,
    epoch           BIGINT NOT NULL DEFAULT 0,       -- fencing token, incremented by each claim
    lease_expires_at BIGINT,                         -- unix milliseconds
    worker_id       TEXT
);
CREATE INDEX jobs_status ON jobs(status, n);

CREATE TABLE events (
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq         BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    level       TEXT NOT NULL,
    type        TEXT NOT NULL,
    message     TEXT NOT NULL,
    data        TEXT,
    step        BIGINT,
    PRIMARY KEY (job_id, seq)
);
-- The event feed's fall-back poll looks at recent events of every job.
CREATE INDEX events_created ON events(created_at);

CREATE TABLE checkpoints (
    id          TEXT PRIMARY KEY,
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    created_at  BIGINT NOT NULL,
    step        BIGINT NOT NULL,
    metrics     TEXT NOT NULL,
    path        TEXT NOT NULL,
    UNIQUE (job_id, step)
);

CREATE TABLE workers (
    id                 TEXT PRIMARY KEY,
    hostname           TEXT NOT NULL,
    device             TEXT NOT NULL,
    memory_total_bytes BIGINT,
    memory_free_bytes  BIGINT,
    current_job        TEXT,
    started_at         BIGINT NOT NULL,
    heartbeat_at       BIGINT NOT NULL
);
