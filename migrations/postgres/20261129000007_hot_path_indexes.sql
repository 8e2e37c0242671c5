-- Indexes for the two searches every busy process makes many times a second.
--
-- The sequencer looks for committed events still without a position. `events_by_position` holds those entries
-- too, but under load the planner scanned the table instead (13 ms a pass at 60,000 events, growing with the log).
-- This partial index holds only the events waiting for a position: a few, whatever the size of the log.
CREATE INDEX events_unsequenced ON events (insert_id) WHERE position IS NULL;

-- The reconciler claims open jobs in id order. Done and failed jobs stay in the table for the record, and the claim
-- walked past all of them on every call (9 ms a claim after 40,000 assigns). Only open jobs are in this index.
CREATE INDEX jobs_open ON jobs (id) WHERE status IN ('pending', 'running');
