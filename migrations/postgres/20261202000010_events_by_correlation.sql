-- The events of one chain (`GET /admin/events?correlation_id=`), found without a scan of the log.
-- Expand-only: an index.
CREATE INDEX IF NOT EXISTS events_by_correlation ON events ((metadata->>'correlation_id'), position);
