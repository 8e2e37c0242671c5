-- Snapshots of our own (cqrs-es 0.5's snapshot modes apply every event twice, and its `snapshots` table stays
-- unused): an aggregate's state after the event at `sequence`, written beside the events every few hundred events
-- (`adapters::store::snapshots`), so that a cold load reads the snapshot and the events after it instead of the
-- whole history. A snapshot is derived data: losing or ignoring one only costs a longer load. `state_version` is
-- the shape of the state it was written in; a snapshot of another shape is ignored.
CREATE TABLE aggregate_snapshots (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL,
    state_version  text   NOT NULL,
    state          text   NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);
