-- Global positions are handed out by the append itself, in commit order, instead of by a sequencer after commit.
--
-- Until now an event was inserted without a position and a sequencer pass gave it one later (an UPDATE of every
-- event: its whole row written twice, a second WAL record with the payload, a dead tuple for vacuum, and 20 ms
-- before any reader saw it). Under the load test the sequencer cost as much database time as the appends.
--
-- Now every append takes the row lock on `event_log_head` first and holds it until it commits: appends are
-- serialised, each one numbers its events after the head it read, and a later append cannot even begin before the
-- earlier one is committed and visible (Postgres releases a transaction's locks after its commit is visible). So
-- positions follow commit order and a reader following them never skips an event, as before. Appends stay batched
-- (`append_batcher`: every unit waiting joins one call), so the lock is taken once per batch, not per event.
--
-- A lost unit keeps nothing, and positions have no gaps.

-- Events inserted without a position by a process still running the previous version are given one now, in insert
-- order, as its sequencer would have.
DO $$
DECLARE
    head bigint;
    assigned bigint;
BEGIN
    SELECT position INTO head FROM event_log_head WHERE id = 1 FOR UPDATE;
    WITH numbered AS (
        SELECT insert_id, head + row_number() OVER (ORDER BY insert_id) AS new_position
        FROM events WHERE position IS NULL
    )
    UPDATE events SET position = numbered.new_position
      FROM numbered WHERE events.insert_id = numbered.insert_id;
    GET DIAGNOSTICS assigned = ROW_COUNT;
    UPDATE event_log_head SET position = head + assigned WHERE id = 1;
END;
$$;

DROP FUNCTION whist_sequence_events(integer);
DROP INDEX events_unsequenced;

-- Every event has a position from now on (checked for new rows only: the rows above were just given theirs, and a
-- check of the whole table would hold the table's lock for a full scan).
ALTER TABLE events ADD CONSTRAINT events_positioned CHECK (position IS NOT NULL) NOT VALID;

DROP FUNCTION whist_append_units(bigint[], text[], text[], bigint[], text[], text[], text[], text[]);

-- Appends units all-or-nothing each, with their global positions, and returns the units that collided with an
-- event already stored (another writer appended to one of their aggregates first); those keep nothing.
-- Callers must not put two events with the same key in one call.
--
-- The common case costs one INSERT: every event is inserted, numbered after the head, with `ON CONFLICT DO NOTHING`,
-- and the unique index finds the collisions. When a unit collided (rare: a stale remembered copy), the call's rows
-- are deleted and the other units inserted again, numbered afresh, so that positions have no gap. (Looking for the
-- collisions first instead costs a join with `events` on every call, whose cached plan, made while the table was
-- small, scanned the whole table.)
CREATE FUNCTION whist_append_units(
    units bigint[],
    aggregate_types text[],
    aggregate_ids text[],
    sequences bigint[],
    event_types text[],
    event_versions text[],
    payloads text[],
    metadatas text[]
) RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    head bigint;
    lost bigint[];
    appended bigint;
BEGIN
    -- The lock comes first, in a statement of its own: a VOLATILE function takes a fresh snapshot for each
    -- statement, so what follows sees every event the previous holder of the lock committed. Every position after
    -- `head` is this call's until it commits.
    SELECT position INTO head FROM event_log_head WHERE id = 1 FOR UPDATE;

    WITH input AS (
        SELECT *
        FROM unnest(units, aggregate_types, aggregate_ids, sequences, event_types, event_versions, payloads,
                    metadatas) WITH ORDINALITY
             AS i(unit, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                  ordinal)
    ), inserted AS (
        INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                            position)
        SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload::json, metadata::json,
               head + ordinal
        FROM input
        ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING
        RETURNING aggregate_type, aggregate_id, sequence
    )
    SELECT coalesce(array_agg(DISTINCT input.unit) FILTER (WHERE inserted.sequence IS NULL), '{}')
    INTO lost
    FROM input
    LEFT JOIN inserted USING (aggregate_type, aggregate_id, sequence);

    appended := cardinality(units);
    IF cardinality(lost) > 0 THEN
        DELETE FROM events WHERE position > head;
        INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                            position)
        SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload::json, metadata::json,
               head + row_number() OVER (ORDER BY ordinal)
        FROM unnest(units, aggregate_types, aggregate_ids, sequences, event_types, event_versions, payloads,
                    metadatas) WITH ORDINALITY
             AS i(unit, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                  ordinal)
        WHERE NOT (unit = ANY (lost));
        GET DIAGNOSTICS appended = ROW_COUNT;
    END IF;

    IF appended > 0 THEN
        UPDATE event_log_head SET position = head + appended WHERE id = 1;
        -- The channel is adapters::store::LOG_CHANNEL; delivered at commit.
        PERFORM pg_notify('whist_event_log', (head + appended)::text);
    END IF;
    RETURN QUERY SELECT unnest(lost);
END;
$$;
