-- The embedded event store (written by sqlite-es) and the global log.
--
-- sqlite-es detects optimistic-concurrency conflicts from the primary-key error (SQLITE_CONSTRAINT_PRIMARYKEY), so
-- the primary key stays (aggregate_type, aggregate_id, sequence). SQLite runs one write transaction at a time, so
-- the order in which the trigger below hands out positions is commit order.
CREATE TABLE events (
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    sequence       integer NOT NULL,
    event_type     text    NOT NULL,
    event_version  text    NOT NULL,
    payload        text    NOT NULL,
    metadata       text    NOT NULL,
    position       integer,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);

CREATE UNIQUE INDEX events_by_position ON events (position);

CREATE TABLE snapshots (
    aggregate_type   text    NOT NULL,
    aggregate_id     text    NOT NULL,
    last_sequence    integer NOT NULL,
    current_snapshot integer NOT NULL,
    payload          text    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

CREATE TABLE event_log_head (
    id       integer PRIMARY KEY CHECK (id = 1),
    position integer NOT NULL
);
INSERT INTO event_log_head (id, position) VALUES (1, 0);

CREATE TRIGGER events_take_position AFTER INSERT ON events
BEGIN
    UPDATE event_log_head SET position = position + 1 WHERE id = 1;
    UPDATE events SET position = (SELECT position FROM event_log_head WHERE id = 1) WHERE rowid = NEW.rowid;
END;

CREATE TABLE projection_checkpoints (
    name       text    PRIMARY KEY,
    position   integer NOT NULL DEFAULT 0,
    status     text    NOT NULL,
    last_error text,
    updated_at integer NOT NULL
);

CREATE TABLE aggregate_index (
    aggregate_type   text    NOT NULL,
    aggregate_id     text    NOT NULL,
    version          integer NOT NULL,
    event_count      integer NOT NULL,
    first_position   integer NOT NULL,
    last_position    integer NOT NULL,
    last_event_type  text    NOT NULL,
    last_recorded_at text    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
