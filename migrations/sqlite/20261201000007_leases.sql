-- Leases (see the Postgres migration of the same name). The embedded store has one process, which always takes
-- the lease; the table keeps the leadership code the same on both backends.
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
