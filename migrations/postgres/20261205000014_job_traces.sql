-- Each job remembers the W3C trace context (`traceparent`) of the decision that planned it, so that the reconciler's
-- span for the job, and its call to the host service, continue the trace of the request that made the decision.
-- Expand-only: a nullable column (jobs planned before this migration, or by a decision without a trace, have none).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS traceparent text;
