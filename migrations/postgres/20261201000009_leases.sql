-- Leases: who may act alone for the deployment (the fleet's leader), renewed by its holder, taken by anyone once
-- expired; each taking gets the next epoch. Times are the database's clock, in milliseconds since the epoch.
-- Expand-only: a new table nothing of the previous release reads.
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
