-- An append can never leave a hole in an aggregate's sequence: an event whose sequence is not 1 is refused unless
-- the event before it is stored (a copy remembered from a store that was since restored to an earlier state would
-- otherwise append sequence 5 to an aggregate that holds only 1). The refusal is SQLITE_CONSTRAINT_TRIGGER, which
-- the store reads as a conflict: the copy is read again before the next decision. A unit inserts its events of one
-- aggregate in sequence order, so the check holds within a unit too.
CREATE TRIGGER events_follow_their_predecessor BEFORE INSERT ON events
WHEN NEW.sequence > 1 AND NOT EXISTS (
    SELECT 1 FROM events
     WHERE aggregate_type = NEW.aggregate_type AND aggregate_id = NEW.aggregate_id AND sequence = NEW.sequence - 1)
BEGIN
    SELECT RAISE(ABORT, 'the event before this one is not stored');
END;
