-- The event store (written by postgres-es) and the global log.
--
-- postgres-es inserts (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) and
-- detects optimistic-concurrency conflicts from the primary key. The other columns have defaults and belong to us:
--   insert_id  is the order of inserts. It is NOT commit order: a transaction can take a smaller insert_id and
--              commit after one with a larger insert_id.
--   position   is the global position in the log, in commit order. The sequencer (adapters::store::sequencer)
--              assigns it after commit, in batches serialised by the row lock on event_log_head, only to events
--              that are committed and visible. A transaction that commits late simply receives a later position,
--              so a reader following `position` never skips an event.
CREATE TABLE events (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL,
    event_type     text   NOT NULL,
    event_version  text   NOT NULL,
    payload        json   NOT NULL,
    metadata       json   NOT NULL,
    insert_id      bigint GENERATED ALWAYS AS IDENTITY,
    position       bigint,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_by_position ON events (position);
CREATE INDEX events_awaiting_position ON events (insert_id) WHERE position IS NULL;

-- cqrs-es snapshots. The snapshot modes of cqrs-es 0.5 apply every event twice, so the project does not use
-- them; the table exists because postgres-es names it.
CREATE TABLE snapshots (
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL,
    current_snapshot bigint NOT NULL,
    payload          json   NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- The last position handed out. Its single row is also the sequencer's lock.
CREATE TABLE event_log_head (
    id       integer PRIMARY KEY CHECK (id = 1),
    position bigint  NOT NULL
);
INSERT INTO event_log_head (id, position) VALUES (1, 0);

-- One row per projection: how far it has read, updated in the same transaction as its read model.
CREATE TABLE projection_checkpoints (
    name       text    PRIMARY KEY,
    position   bigint  NOT NULL DEFAULT 0,
    status     text    NOT NULL,
    last_error text,
    updated_at bigint  NOT NULL
);

-- Read model of the `aggregate_index` projection: every aggregate, its version and where it stands in the log.
CREATE TABLE aggregate_index (
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    version          bigint NOT NULL,
    event_count      bigint NOT NULL,
    first_position   bigint NOT NULL,
    last_position    bigint NOT NULL,
    last_event_type  text   NOT NULL,
    last_recorded_at text   NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
