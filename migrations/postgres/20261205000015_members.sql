-- The live processes that serve assigns, each renewing its row every second by the database's clock: assigns
-- partition the hosts among them (rendezvous hashing), so that several processes fill different hosts instead of
-- racing for the same fullest ones. Only a preference: the store's optimistic concurrency still decides.
-- Expand-only: a new table nothing of the previous release reads.
CREATE TABLE IF NOT EXISTS members (
    member_id TEXT PRIMARY KEY,
    seen_at_ms BIGINT NOT NULL
);
