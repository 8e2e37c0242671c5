-- The reconciler claims open jobs in id order; done and failed jobs stay in the table for the record. Only open
-- jobs are in this index, so a claim does not walk past every job ever run. (Events need no such index here: on
-- SQLite a trigger gives each event its position at insert.)
CREATE INDEX jobs_open ON jobs (id) WHERE status IN ('pending', 'running');
