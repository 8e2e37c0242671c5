-- Coarse planner statistics (target 10 instead of the default 100) on the tables that grow with every assign: the
-- event log, its hash chain, the aggregate index and snapshots, the mandelboxes and the jobs.
--
-- ANALYZE reads a sample of 300 rows per unit of the largest target among a table's columns, so 30,000 rows at
-- the default, then sorts every column's sample to build its histogram and most common values, and parses the
-- metadata of every sampled event for the correlation index's expression. Autovacuum analyses a table each time a
-- tenth of it has changed. With the default that pass cost 0.14-0.19 s of CPU for `events` and 0.05-0.11 s each
-- for `aggregate_index`, `mandelboxes`, `jobs` and `event_chain`, in one burst at half to two thirds of a core (the
-- cost delay paces page reads, not the sorting). Where Postgres shares its cores with the server, those bursts were
-- some of the half-rate load test's stalls: a hundred assigns answered late in the seconds of the pass. At target
-- 10 the same passes cost at most 0.02 s (`events`) and 0.01 s (the others).
--
-- Nothing the server asks these tables needs finer statistics. Every hot statement goes by a unique key or walks an
-- index in order with a limit (the append and its positions, an aggregate's history, the claim, whose plan is fixed
-- in migration 0017); the console's listings read small results. Eleven histogram bounds and ten common values
-- still tell a status column's few values apart and a range's rough share.
--
-- A column added to these tables later must be given the same target, or ANALYZE's sample grows back to 30,000
-- rows: the `store::every_column_of_the_growing_tables_keeps_coarse_statistics` test checks it. SET STATISTICS
-- takes a SHARE UPDATE EXCLUSIVE lock, which reads and writes do not wait for; it changes no data and nothing a
-- previous release reads (expand-only).

ALTER TABLE events
    ALTER COLUMN aggregate_type SET STATISTICS 10,
    ALTER COLUMN aggregate_id SET STATISTICS 10,
    ALTER COLUMN sequence SET STATISTICS 10,
    ALTER COLUMN event_type SET STATISTICS 10,
    ALTER COLUMN event_version SET STATISTICS 10,
    ALTER COLUMN payload SET STATISTICS 10,
    ALTER COLUMN metadata SET STATISTICS 10,
    ALTER COLUMN insert_id SET STATISTICS 10,
    ALTER COLUMN position SET STATISTICS 10;

-- The expression `metadata->>'correlation_id'` has statistics of its own, gathered by parsing each sampled row.
ALTER INDEX events_by_correlation ALTER COLUMN 1 SET STATISTICS 10;

ALTER TABLE event_chain
    ALTER COLUMN position SET STATISTICS 10,
    ALTER COLUMN hash SET STATISTICS 10;

ALTER TABLE aggregate_index
    ALTER COLUMN aggregate_type SET STATISTICS 10,
    ALTER COLUMN aggregate_id SET STATISTICS 10,
    ALTER COLUMN version SET STATISTICS 10,
    ALTER COLUMN event_count SET STATISTICS 10,
    ALTER COLUMN first_position SET STATISTICS 10,
    ALTER COLUMN last_position SET STATISTICS 10,
    ALTER COLUMN last_event_type SET STATISTICS 10,
    ALTER COLUMN last_recorded_at SET STATISTICS 10;

ALTER TABLE aggregate_snapshots
    ALTER COLUMN aggregate_type SET STATISTICS 10,
    ALTER COLUMN aggregate_id SET STATISTICS 10,
    ALTER COLUMN sequence SET STATISTICS 10,
    ALTER COLUMN state_version SET STATISTICS 10,
    ALTER COLUMN state SET STATISTICS 10;

ALTER TABLE mandelboxes
    ALTER COLUMN mandelbox_id SET STATISTICS 10,
    ALTER COLUMN instance_id SET STATISTICS 10,
    ALTER COLUMN user_id SET STATISTICS 10,
    ALTER COLUMN session_id SET STATISTICS 10,
    ALTER COLUMN region SET STATISTICS 10,
    ALTER COLUMN ip SET STATISTICS 10,
    ALTER COLUMN status SET STATISTICS 10,
    ALTER COLUMN created_at SET STATISTICS 10,
    ALTER COLUMN updated_at SET STATISTICS 10;

ALTER TABLE jobs
    ALTER COLUMN id SET STATISTICS 10,
    ALTER COLUMN kind SET STATISTICS 10,
    ALTER COLUMN job_key SET STATISTICS 10,
    ALTER COLUMN aggregate_id SET STATISTICS 10,
    ALTER COLUMN payload SET STATISTICS 10,
    ALTER COLUMN status SET STATISTICS 10,
    ALTER COLUMN attempts SET STATISTICS 10,
    ALTER COLUMN run_after_ms SET STATISTICS 10,
    ALTER COLUMN claimed_until_ms SET STATISTICS 10,
    ALTER COLUMN last_error SET STATISTICS 10,
    ALTER COLUMN created_ms SET STATISTICS 10,
    ALTER COLUMN finished_ms SET STATISTICS 10,
    ALTER COLUMN correlation_id SET STATISTICS 10,
    ALTER COLUMN planned_by SET STATISTICS 10,
    ALTER COLUMN traceparent SET STATISTICS 10;
