-- The live processes that serve assigns (see the Postgres migration).
CREATE TABLE IF NOT EXISTS members (
    member_id TEXT PRIMARY KEY,
    seen_at_ms BIGINT NOT NULL
);
