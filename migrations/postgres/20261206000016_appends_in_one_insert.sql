-- The checked append (migration 0012) in one INSERT, with the same arguments, answers and checks.
--
-- Migration 0012 checked a call in one statement of six parts (the head, the input, each aggregate's first event,
-- the units with a hole, the admitted rows numbered afresh, the insert) and matched every input row to the row it
-- inserted. A one-event call took 0.38-0.46 ms against 0.30-0.32 ms for the lock, the head and a bare INSERT
-- (pgbench, one client, `synchronous_commit` off); this body takes 0.30-0.38 ms, and 2.07-2.72 ms against
-- 2.23-3.03 ms for 100 events. Every call pays it once, under the lock that serialises appends, so it counted most
-- for one writer and for processes that each append their own small batches.
--
-- Now the common case is three short statements: the lock; the head (in a statement of its own, begun after the
-- lock, so that it sees every event the previous holder committed); and one INSERT whose rows are admitted when
--   - the event is its aggregate's first (sequence 1),
--   - or the event before it is in the same unit (a hash of the call's keys, built once per call),
--   - or the event before it is stored (one probe of the primary key),
-- numbered after the head by their place in the call, `ON CONFLICT DO NOTHING`. A unit is whole when every row of
-- it was inserted, which the row count tells at once in the common case. Only when rows are missing (a unit with a
-- hole in an aggregate's sequence, or one that collided with a stored event or with an earlier unit of the same
-- call) are the lost units found, by the positions not inserted; then, as before, this call's rows are taken back
-- and the other units inserted again, numbered afresh, so that positions have no gap.
--
-- What a unit must satisfy is unchanged. Its first event of an aggregate must be sequence 1 or follow a stored
-- event (migration 0012's first fault); an event that follows another unit's event in the same call has no stored
-- predecessor when the statement begins, so its unit is lost and retried on fresh state, as before. Two units
-- wanting one key record one and report the other lost (the second fault). The head is the largest position stored
-- (the third).
--
-- The plan is generic and fixed: a custom plan per call costs a planning per call (0.6 ms a call when forced), and
-- sequential scans are off so that no plan can scan the log. The signature is unchanged: processes of the previous
-- release append through the same function, with the same lock.

CREATE OR REPLACE FUNCTION whist_append_units_checked(
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
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    previous_head bigint;
    lost_units bigint[] := '{}';
    appended bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7730, 1);
    SELECT coalesce(max(e.position), 0) INTO previous_head FROM events AS e;

    INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                        position)
    SELECT i.aggregate_type, i.aggregate_id, i.sequence, i.event_type, i.event_version, i.payload::json,
           i.metadata::json, previous_head + i.ordinal
      FROM unnest(units, aggregate_types, aggregate_ids, sequences, event_types, event_versions, payloads,
                  metadatas) WITH ORDINALITY
           AS i(unit, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, ordinal)
      -- One probe of the primary key per event, by a LATERAL subquery: it can only run once per row, so no plan
      -- (the generic one, made at a session's first call, perhaps while the log was empty) can turn it into a scan
      -- of the log hashed once per call, as an EXISTS here was (11 ms a call at 20,000 events).
      LEFT JOIN LATERAL (
               SELECT 1 AS stored
                 FROM events AS e
                WHERE i.sequence > 1
                  AND e.aggregate_type = i.aggregate_type
                  AND e.aggregate_id = i.aggregate_id
                  AND e.sequence = i.sequence - 1
                LIMIT 1) AS predecessor ON true
     WHERE i.sequence = 1
        OR predecessor.stored IS NOT NULL
        OR (i.unit, i.aggregate_type, i.aggregate_id, i.sequence - 1) IN (
               SELECT same_unit.unit, same_unit.aggregate_type, same_unit.aggregate_id, same_unit.sequence
                 FROM unnest(units, aggregate_types, aggregate_ids, sequences)
                      AS same_unit(unit, aggregate_type, aggregate_id, sequence))
    ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING;
    GET DIAGNOSTICS appended = ROW_COUNT;

    IF appended < cardinality(units) THEN
        -- Every position after the head is this call's (the lock is held), so a missing one is a row not inserted.
        SELECT coalesce(array_agg(DISTINCT i.unit), '{}')
          INTO lost_units
          FROM unnest(units) WITH ORDINALITY AS i(unit, ordinal)
          LEFT JOIN LATERAL (
                SELECT 1 AS stored FROM events AS e WHERE e.position = previous_head + i.ordinal LIMIT 1
               ) AS inserted ON true
         WHERE inserted.stored IS NULL;
        -- A unit is all or nothing: take back this call's rows and insert the units that are whole again, numbered
        -- afresh so that positions have no gap.
        DELETE FROM events WHERE position > previous_head AND position <= previous_head + cardinality(units);
        INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                            position)
        SELECT i.aggregate_type, i.aggregate_id, i.sequence, i.event_type, i.event_version, i.payload::json,
               i.metadata::json, previous_head + row_number() OVER (ORDER BY i.ordinal)
          FROM unnest(units, aggregate_types, aggregate_ids, sequences, event_types, event_versions, payloads,
                      metadatas) WITH ORDINALITY
               AS i(unit, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,
                    ordinal)
         WHERE NOT (i.unit = ANY (lost_units));
        GET DIAGNOSTICS appended = ROW_COUNT;
    END IF;

    IF appended > 0 THEN
        -- The channel is adapters::store::LOG_CHANNEL; delivered at commit.
        PERFORM pg_notify('whist_event_log', (previous_head + appended)::text);
    END IF;
    RETURN QUERY SELECT lost_units, previous_head + appended;
END;
$$;
