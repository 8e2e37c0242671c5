-- The reconciler's claim as a function whose plan walks the open jobs' index in id order (`jobs_open`, migration
-- 0007), so that each claim passes the versions of jobs that are no longer open once, and never again.
--
-- Every job leaves versions behind: it is inserted pending, claimed running, written done, and each change of status
-- is a new row version with new index entries (status is in every index's key or predicate, so none is HOT). Until
-- vacuum removes them, the indexes keep pointing at the old versions. The claim, written as one statement, was
-- planned as bitmap scans of `jobs_waiting` OR'ed together, then a sort: a bitmap scan visits the heap page of
-- every entry it finds and never marks an entry dead, so each claim visited every old version again. After a load
-- test's 22,000 assigns, with no job left open, an empty claim visited 941 heap pages (1.6 ms), and the claims of
-- two processes took 0.48 ms a call against 0.14 ms for one (`pg_stat_statements`, `whist loadtest`).
--
-- A plain index scan marks the entries of versions no transaction can see any more as dead when it first meets
-- them; later scans skip them without a heap visit, and the index reclaims their room before it splits a page. So
-- the same empty claim, planned as a scan of `jobs_open`, read no heap page and took 0.05 ms. Bitmap and
-- sequential scans are off inside this function only, and its plan is generic and fixed (planned once per
-- session), as the append's is (migration 0016).
--
-- What a claim takes is unchanged: up to `max_jobs` jobs of `kinds`, lowest id first, pending ones whose
-- `run_after_ms` has come and running ones whose claim expired before `now_ms`, each taken `FOR UPDATE SKIP
-- LOCKED` so that processes claiming at once take different jobs, each claim one more attempt. Expand-only:
-- processes of the previous release claim with their own statement, which takes the same rows the same way.

CREATE OR REPLACE FUNCTION whist_claim_jobs(
    now_ms bigint,
    claimed_until bigint,
    max_jobs bigint,
    kinds text[]
) RETURNS TABLE (
    id bigint,
    kind text,
    aggregate_id text,
    payload text,
    attempts bigint,
    correlation_id text,
    planned_by bigint,
    traceparent text
)
LANGUAGE plpgsql VOLATILE
SET enable_bitmapscan = off
SET enable_seqscan = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    UPDATE jobs AS claimed
       SET status = 'running', attempts = claimed.attempts + 1, claimed_until_ms = claimed_until
     WHERE claimed.id IN (
               SELECT open.id
                 FROM jobs AS open
                WHERE open.status IN ('pending', 'running')
                  AND ((open.status = 'pending' AND open.run_after_ms <= now_ms)
                       OR (open.status = 'running' AND open.claimed_until_ms < now_ms))
                  AND open.kind = ANY (kinds)
                ORDER BY open.id
                LIMIT max_jobs
                  FOR UPDATE SKIP LOCKED)
    RETURNING claimed.id, claimed.kind, claimed.aggregate_id, claimed.payload, claimed.attempts,
              claimed.correlation_id, claimed.planned_by, claimed.traceparent;
END;
$$;
