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

-- Also serves the sequencer's search for events still without a position (`position IS NULL`).
CREATE UNIQUE INDEX events_by_position ON events (position);

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

-- One pass of the sequencer, in one round trip and one commit: hands out positions to up to `batch_size`
-- committed events, in insert order, after the current head. Returns how many events it sequenced, or -1 when
-- another sequencer holds the lock (it will see these events itself or on its next pass).
--
-- The lock is taken in its own statement before the UPDATE: a VOLATILE function takes a fresh snapshot for each
-- statement, so the UPDATE sees every position the previous lock holder committed and never hands one out twice.
CREATE FUNCTION whist_sequence_events(batch_size integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    head bigint;
    assigned bigint;
BEGIN
    -- Idle passes take no lock (a lock costs a commit flush).
    IF NOT EXISTS (SELECT 1 FROM events WHERE position IS NULL) THEN
        RETURN 0;
    END IF;
    SELECT position INTO head FROM event_log_head WHERE id = 1 FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN -1;
    END IF;
    WITH ready AS (
        SELECT insert_id FROM events WHERE position IS NULL ORDER BY insert_id LIMIT batch_size
    ), numbered AS (
        SELECT insert_id, head + row_number() OVER (ORDER BY insert_id) AS new_position FROM ready
    )
    UPDATE events
       SET position = numbered.new_position
      FROM numbered
     WHERE events.insert_id = numbered.insert_id AND events.position IS NULL;
    GET DIAGNOSTICS assigned = ROW_COUNT;
    IF assigned > 0 THEN
        UPDATE event_log_head SET position = head + assigned WHERE id = 1;
        -- The channel is adapters::store::sequencer::LOG_CHANNEL.
        PERFORM pg_notify('whist_event_log', (head + assigned)::text);
    END IF;
    RETURN assigned;
END;
$$;

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
