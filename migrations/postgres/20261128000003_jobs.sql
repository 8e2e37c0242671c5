-- Side-effect jobs: what the reconciler must do outside (start a host, start a mandelbox on its host), planned
-- from the log by the `jobs` projection (one row per decision, keyed so a replay plans nothing twice) and claimed
-- by workers. HireFire's queue depth is the number of jobs waiting.
CREATE TABLE jobs (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind             text   NOT NULL,
    job_key          text   NOT NULL UNIQUE,
    aggregate_id     text   NOT NULL,
    payload          text   NOT NULL,
    status           text   NOT NULL,
    attempts         bigint NOT NULL DEFAULT 0,
    run_after_ms     bigint NOT NULL,
    claimed_until_ms bigint NOT NULL DEFAULT 0,
    last_error       text,
    created_ms       bigint NOT NULL,
    finished_ms      bigint
);
CREATE INDEX jobs_waiting ON jobs (status, run_after_ms);
