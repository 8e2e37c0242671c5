-- Each job remembers the chain of the decision that planned it and that event's position, so that the outcome the
-- reconciler records continues the chain (`correlation_id`) with the planning event as its cause (`causation_id`).
-- Expand-only: nullable columns (jobs planned before this migration have neither; their outcomes start a chain).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS correlation_id text;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS planned_by bigint;
