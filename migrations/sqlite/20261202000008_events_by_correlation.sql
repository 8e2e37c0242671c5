-- The events of one chain (`GET /admin/events?correlation_id=`), found without a scan of the log.
CREATE INDEX IF NOT EXISTS events_by_correlation ON events (json_extract(metadata, '$.correlation_id'), position);
