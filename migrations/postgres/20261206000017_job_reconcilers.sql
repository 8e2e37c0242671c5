-- Each job names the reconciler that claims it first: the process that took the decision planning it, by its
-- member id, when that process runs a reconciler (it remembers the aggregates the job acts on). The others claim it
-- once it has waited `jobs::OTHERS_AFTER`, so a job of a process that stopped is still run.
-- Expand-only: a nullable column (jobs planned before this migration, or by a decision that named no reconciler,
-- have none, and any reconciler claims them at once).
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS reconciler text;
