-- Read model of the `images` projection: per region, every image a release named and what it is now
-- (PREPARED, ACTIVE, RETIRED, ROLLED_BACK). One row per region and commit hash.
CREATE TABLE region_images (
    region             text   NOT NULL,
    client_commit_hash text   NOT NULL,
    image_id           text   NOT NULL,
    status             text   NOT NULL,
    generation         bigint,
    position           bigint NOT NULL,
    updated_at         text   NOT NULL,
    PRIMARY KEY (region, client_commit_hash)
);
