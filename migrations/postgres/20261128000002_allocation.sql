-- Secrets the webserver derives its one-time and per-host tokens from (generated at first start, never logged).
CREATE TABLE server_secrets (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- Liveness of hosts. Heartbeats are not events: they are written here in batches, and only a change (a host going
-- silent, coming back) becomes an event.
CREATE TABLE host_heartbeats (
    instance_id      text    PRIMARY KEY,
    last_seen_ms     bigint  NOT NULL,
    heartbeat_number bigint  NOT NULL,
    total_ram_kb     bigint  NOT NULL,
    free_ram_kb      bigint  NOT NULL,
    avail_ram_kb     bigint  NOT NULL,
    is_dying         bigint  NOT NULL
);

-- Read model of the `instances` projection: every host and its fill.
CREATE TABLE instances (
    instance_id        text    PRIMARY KEY,
    cloud_instance_id  text,
    region             text    NOT NULL,
    image_id           text    NOT NULL,
    client_commit_hash text    NOT NULL,
    instance_type      text    NOT NULL,
    ip                 text,
    status             text    NOT NULL,
    mandelbox_capacity bigint  NOT NULL,
    live_mandelboxes   bigint  NOT NULL,
    launched_at        text    NOT NULL,
    updated_at         text    NOT NULL
);
CREATE INDEX instances_with_room ON instances (region, client_commit_hash, status, live_mandelboxes);

-- Read model of the `mandelboxes` projection.
CREATE TABLE mandelboxes (
    mandelbox_id text   PRIMARY KEY,
    instance_id  text   NOT NULL,
    user_id      text   NOT NULL,
    session_id   bigint NOT NULL,
    region       text   NOT NULL,
    ip           text   NOT NULL,
    status       text   NOT NULL,
    created_at   text   NOT NULL,
    updated_at   text   NOT NULL
);
CREATE INDEX mandelboxes_by_user ON mandelboxes (user_id, status);
CREATE INDEX mandelboxes_by_instance ON mandelboxes (instance_id, status);
