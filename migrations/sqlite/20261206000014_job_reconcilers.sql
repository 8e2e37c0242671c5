-- Each job names the reconciler that claims it first (see the Postgres migration).
ALTER TABLE jobs ADD COLUMN reconciler TEXT;
