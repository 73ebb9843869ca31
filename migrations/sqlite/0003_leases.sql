-- Claims with leases and fencing, and the worker registry. A claim increments `epoch` (the
-- fencing token every write of the claiming worker carries) and sets `lease_expires_at` (unix
-- milliseconds, renewed by the worker's heartbeat); `worker_id` names the claimant.
ALTER TABLE jobs ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN lease_expires_at INTEGER;
ALTER TABLE jobs ADD COLUMN worker_id TEXT;

CREATE TABLE workers (
    id                 TEXT PRIMARY KEY,                 -- wrk-…
    hostname           TEXT NOT NULL,
    device             TEXT NOT NULL,                    -- cpu, cuda:0, …
    memory_total_bytes INTEGER,
    memory_free_bytes  INTEGER,
    current_job        TEXT,
    started_at         INTEGER NOT NULL,                 -- unix seconds
    heartbeat_at       INTEGER NOT NULL                  -- unix milliseconds
);
