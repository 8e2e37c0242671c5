-- Each job remembers the chain and position of the event that planned it (see the Postgres migration).
ALTER TABLE jobs ADD COLUMN correlation_id TEXT;
ALTER TABLE jobs ADD COLUMN planned_by BIGINT;
