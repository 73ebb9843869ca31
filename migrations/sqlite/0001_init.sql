-- sftd schema: uploaded/result files, jobs, their events (per-job monotonic seq) and checkpoints.

CREATE TABLE files (
    id          TEXT PRIMARY KEY,            -- file-…
    created_at  INTEGER NOT NULL,            -- unix seconds
    filename    TEXT NOT NULL,
    purpose     TEXT NOT NULL,               -- fine-tune | fine-tune-results
    bytes       INTEGER NOT NULL,
    path        TEXT NOT NULL,               -- relative to the data dir
    rows        INTEGER,                     -- validated JSONL rows (uploads only)
    job_id      TEXT                         -- the job that produced a result file
);
CREATE INDEX files_job ON files(job_id);

CREATE TABLE jobs (
    n               INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order (FIFO and list order)
    id              TEXT NOT NULL UNIQUE,               -- ftjob-…
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    model           TEXT NOT NULL,
    training_file   TEXT NOT NULL,
    validation_file TEXT,
    status          TEXT NOT NULL,
    spec            TEXT NOT NULL,                      -- the request body as parsed (JSON)
    config          TEXT NOT NULL,                      -- the resolved TrainConfig (JSON)
    seed            INTEGER NOT NULL,
    suffix          TEXT,
    metadata        TEXT,                               -- JSON object or NULL
    fine_tuned_model TEXT,
    trained_tokens  INTEGER,
    estimated_finish INTEGER,
    error_code      TEXT,
    error_message   TEXT,
    error_param     TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,          -- times a worker started it
    idempotency_key TEXT UNIQUE
);
CREATE INDEX jobs_status ON jobs(status, n);

CREATE TABLE events (
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    seq         INTEGER NOT NULL,                        -- 1, 2, 3, … per job; the SSE id
    created_at  INTEGER NOT NULL,
    level       TEXT NOT NULL,                           -- info | warn | error
    type        TEXT NOT NULL,                           -- message | metrics
    message     TEXT NOT NULL,
    data        TEXT,                                    -- JSON or NULL
    step        INTEGER,                                 -- optimizer step of metrics events
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

CREATE TABLE checkpoints (
    id          TEXT PRIMARY KEY,                        -- ftckpt-…
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    metrics     TEXT NOT NULL,                           -- JSON
    path        TEXT NOT NULL,
    UNIQUE (job_id, step)
);
