-- Appends that cannot write a hole, cannot misreport a unit, and do not slow down under an open snapshot.
--
-- Three faults of `whist_append_units` (migration 0008) are fixed here:
-- 1. A remembered copy whose store moved backwards (a failover to an asynchronous standby, a point-in-time
--    restore) appended sequence 5 to an aggregate that held only 1: concurrency was checked by the primary key
--    alone. Now a unit whose first event of an aggregate is not sequence 1 is refused (returned as lost, like a
--    collision) unless the event before it is stored.
-- 2. Two units with the same key in one call were both reported recorded while only one row was inserted, and the
--    head moved by two: a gap that stops the `event_chain` seal for good. Now each input row is matched to the row
--    it inserted by position, so the second unit is reported lost. And after a collision only the rows this call
--    inserted are deleted (by their positions), never other rows above the head.
-- 3. Every append updated the one row of `event_log_head` while holding its lock. Under any long open snapshot (a
--    `pg_dump`, a report) none of that row's old versions can be pruned, and every append walked all of them
--    while holding the lock that serialises appends: 8,000 versions took a lock from 0.08 to 0.44 ms. Now appends
--    are serialised by a transaction-scoped advisory lock, and the head is the largest position stored (the
--    rightmost entry of `events_by_position`, which an insert-only table never fills with dead entries).
--    `event_log_head` becomes a view with the same columns, so every reader, of this release or the previous
--    one, reads it as before.
--
-- Appends stay serialised and positions still follow commit order: the advisory lock is released after the
-- commit is visible (as the row lock was), and the next holder reads the head in a statement of its own, with a
-- fresh snapshot (the function is VOLATILE).
--
-- The lock is (7730, 1) in the two-key space of advisory locks; nothing else in the schema uses that space.

CREATE FUNCTION whist_append_units_checked(
    units bigint[],
    aggregate_types text[],
    aggregate_ids text[],
    sequences bigint[],
    event_types text[],
    event_versions text[],
    payloads text[],
    metadatas text[]
) RETURNS TABLE (lost bigint[], head bigint)
LANGUAGE plpgsql VOLATILE
-- Every lookup below is by key (the primary key, `events_by_position`): a plan cached while the table was small
-- must not scan the whole table once it has grown (a hash anti-join over the whole primary key did, until the
-- predecessor probe became a LATERAL subquery).
SET enable_seqscan = off
AS $$
DECLARE
    previous_head bigint;
    refused bigint[];
    collided bigint[];
    inserted_positions bigint[];
    appended bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7730, 1);
    -- One statement, begun after the lock, so that it sees every event the previous holder committed: the head
    -- (the largest position stored), the units that would leave a hole in an aggregate's sequence (refused), and
    -- the INSERT of the others, numbered after the head; the rows that collided with a stored event are found by
    -- the positions that were not inserted. (One statement, not three: each costs its own executor start.)
    WITH stored_head AS (
        SELECT coalesce(max(e.position), 0) AS position FROM events AS e
    ), input AS (
        SELECT i.*
          FROM unnest(units, aggregate_types, aggregate_ids, sequences, event_types, event_versions, payloads,
                      metadatas) WITH ORDINALITY
               AS i(unit, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                    ordinal)
    ), first_events AS (
        SELECT unit, aggregate_type, aggregate_id, min(sequence) AS sequence
          FROM input
         GROUP BY unit, aggregate_type, aggregate_id
    ), holed AS (
        -- One probe of the primary key per aggregate, by a LATERAL subquery: it can only run once per row, so no
        -- plan (a generic one cached while the table was small included) can turn it into a scan of the table.
        SELECT DISTINCT first_events.unit
          FROM first_events
          LEFT JOIN LATERAL (
                SELECT 1 AS stored
                  FROM events AS e
                 WHERE e.aggregate_type = first_events.aggregate_type
                   AND e.aggregate_id = first_events.aggregate_id
                   AND e.sequence = first_events.sequence - 1
                 LIMIT 1) AS predecessor ON true
         WHERE first_events.sequence > 1 AND predecessor.stored IS NULL
    ), admitted AS (
        SELECT input.*, row_number() OVER (ORDER BY input.ordinal) AS rank
          FROM input
         WHERE input.unit NOT IN (SELECT holed.unit FROM holed)
    ), inserted AS (
        INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                            position)
        SELECT admitted.aggregate_type, admitted.aggregate_id, admitted.sequence, admitted.event_type,
               admitted.event_version, admitted.payload::json, admitted.metadata::json,
               stored_head.position + admitted.rank
          FROM admitted, stored_head
        ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING
        RETURNING position
    )
    SELECT (SELECT coalesce(array_agg(holed.unit), '{}') FROM holed),
           coalesce(array_agg(DISTINCT admitted.unit) FILTER (WHERE inserted.position IS NULL), '{}'),
           coalesce(array_agg(inserted.position) FILTER (WHERE inserted.position IS NOT NULL), '{}'),
           (SELECT stored_head.position FROM stored_head)
      INTO refused, collided, inserted_positions, previous_head
      FROM admitted
      LEFT JOIN inserted ON inserted.position = (SELECT stored_head.position FROM stored_head) + admitted.rank;

    appended := cardinality(inserted_positions);
    IF cardinality(collided) > 0 THEN
        -- A unit is all or nothing: take back this call's rows and insert the units that did not collide again,
        -- numbered afresh so that positions have no gap.
        DELETE FROM events WHERE position = ANY (inserted_positions);
        INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                            position)
        SELECT i.aggregate_type, i.aggregate_id, i.sequence, i.event_type, i.event_version, i.payload::json,
               i.metadata::json, previous_head + row_number() OVER (ORDER BY i.ordinal)
          FROM unnest(units, aggregate_types, aggregate_ids, sequences, event_types, event_versions, payloads,
                      metadatas) WITH ORDINALITY
               AS i(unit, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                    ordinal)
         WHERE NOT (i.unit = ANY (refused) OR i.unit = ANY (collided));
        GET DIAGNOSTICS appended = ROW_COUNT;
    END IF;

    IF appended > 0 THEN
        -- The channel is adapters::store::LOG_CHANNEL; delivered at commit.
        PERFORM pg_notify('whist_event_log', (previous_head + appended)::text);
    END IF;
    RETURN QUERY SELECT refused || collided, previous_head + appended;
END;
$$;

-- Processes of the previous release call the old function by its old signature: it now appends the same way.
CREATE OR REPLACE FUNCTION whist_append_units(
    units bigint[],
    aggregate_types text[],
    aggregate_ids text[],
    sequences bigint[],
    event_types text[],
    event_versions text[],
    payloads text[],
    metadatas text[]
) RETURNS SETOF bigint
LANGUAGE sql VOLATILE AS $$
    SELECT unnest(checked.lost)
      FROM whist_append_units_checked(units, aggregate_types, aggregate_ids, sequences, event_types,
                                      event_versions, payloads, metadatas) AS checked;
$$;

-- The head, as every reader has read it: `SELECT position FROM event_log_head WHERE id = 1`.
DROP TABLE event_log_head;
CREATE VIEW event_log_head AS
SELECT 1 AS id, coalesce(max(position), 0)::bigint AS position FROM events;
