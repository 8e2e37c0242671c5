-- Each job remembers the trace context of the decision that planned it (see the Postgres migration).
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
