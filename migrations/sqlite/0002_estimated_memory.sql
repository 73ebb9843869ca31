-- The job's estimated peak memory in bytes (an sftd extension on the job object): set when the
-- job is created, or when the worker has resolved a hub model's config; NULL until then.
ALTER TABLE jobs ADD COLUMN estimated_peak_memory_bytes INTEGER;
