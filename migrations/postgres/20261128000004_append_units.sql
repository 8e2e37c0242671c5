-- Group commit of whole commands, several aggregates each.
--
-- A unit is the events one decision appends, possibly to several aggregates (an assign: the user's reservation, the
-- host's slot, the mandelbox, the session). Units are all-or-nothing: when any event of a unit collides with a
-- stored sequence number (another writer appended to that aggregate first), none of that unit's events stays.
-- Many units share one call, one statement and one commit; the units that collided are returned.
--
-- Rows are inserted in key order (aggregate type, id, sequence): every writer then waits for another's uncommitted
-- row in one global order, so concurrent calls never deadlock; and the identity (with it the global position the
-- sequencer hands out) follows each aggregate's sequence. Callers must not put two events with the same key in one
-- call.
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
LANGUAGE plpgsql AS $$
DECLARE
    lost bigint[];
    inserted_ids bigint[];
    inserted_units bigint[];
BEGIN
    WITH input AS (
        SELECT *
        FROM unnest(units, aggregate_types, aggregate_ids, sequences, event_types, event_versions, payloads,
                    metadatas)
             AS i(unit, aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
    ), inserted AS (
        INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
        SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload::json, metadata::json
        FROM input
        ORDER BY aggregate_type, aggregate_id, sequence
        ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING
        RETURNING aggregate_type, aggregate_id, sequence, insert_id
    )
    SELECT coalesce(array_agg(DISTINCT input.unit) FILTER (WHERE inserted.insert_id IS NULL), '{}'),
           coalesce(array_agg(inserted.insert_id) FILTER (WHERE inserted.insert_id IS NOT NULL), '{}'),
           coalesce(array_agg(input.unit) FILTER (WHERE inserted.insert_id IS NOT NULL), '{}')
    INTO lost, inserted_ids, inserted_units
    FROM input
    LEFT JOIN inserted USING (aggregate_type, aggregate_id, sequence);

    IF cardinality(lost) > 0 THEN
        -- Only rows this call inserted: the rows a lost unit collided with belong to other writers.
        DELETE FROM events
        WHERE insert_id IN (
            SELECT id FROM unnest(inserted_ids, inserted_units) AS t(id, unit) WHERE unit = ANY (lost)
        );
    END IF;
    RETURN QUERY SELECT unnest(lost);
END;
$$;
