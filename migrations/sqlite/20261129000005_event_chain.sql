-- Seals of the `event_chain` projection: each event's chain hash (adapters::store::chain), in position order.
-- `whist events verify` recomputes the chain from `events` and compares it with these seals.
CREATE TABLE event_chain (
    position integer PRIMARY KEY,
    hash     text   NOT NULL
);
