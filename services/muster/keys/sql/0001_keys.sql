CREATE SCHEMA keys;

-- One row once the cluster's keys are defined; the INSERT of this row is the definition's race:
-- concurrent definers conflict on the primary key and exactly one inserts it.
-- source: 1 generated, 2 uploaded (KeysSource numbers).
CREATE TABLE keys.cluster (
    id smallint PRIMARY KEY CHECK (id = 1),
    source smallint NOT NULL,
    defined_by bigint NOT NULL DEFAULT 0,
    define_time timestamptz NOT NULL DEFAULT now()
);

-- Key versions. Key material is stored only sealed (AES-256-GCM under the master key, which never
-- enters the database); master_key_id names the master key that sealed it. A RETIRED version's
-- sealed material is wiped; its fingerprints stay for the status view.
-- state: 1 pending, 2 active, 3 retiring, 4 retired (KeyVersion.State numbers).
CREATE TABLE keys.versions (
    version integer PRIMARY KEY,
    state smallint NOT NULL CHECK (state BETWEEN 1 AND 4),
    cookie_fingerprint text NOT NULL,
    launcher_fingerprint text NOT NULL,
    cookie_sealed bytea,
    launcher_sealed bytea,
    master_key_id text NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    promote_time timestamptz,
    retire_time timestamptz
);
-- At most one PENDING and one ACTIVE version.
CREATE UNIQUE INDEX versions_one_pending_one_active ON keys.versions (state) WHERE state IN (1, 2);

-- Nodes known to the keys service: from their own calls (verify, upload, fetch, ack) and from the
-- registry's events. live: counts for promotion. revision: the newest registry event applied.
CREATE TABLE keys.nodes (
    node_id bigint PRIMARY KEY,
    live boolean NOT NULL,
    revision bigint NOT NULL DEFAULT 0,
    first_seen_time timestamptz NOT NULL DEFAULT now(),
    update_time timestamptz NOT NULL DEFAULT now()
);

-- Which node acknowledged holding which version.
CREATE TABLE keys.node_acks (
    node_id bigint NOT NULL REFERENCES keys.nodes (node_id) ON DELETE CASCADE,
    version integer NOT NULL REFERENCES keys.versions (version) ON DELETE CASCADE,
    ack_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (node_id, version)
);
CREATE INDEX node_acks_version ON keys.node_acks (version);

-- The audit of key fetches (kept across resets).
CREATE TABLE keys.fetches (
    fetch_id bigserial PRIMARY KEY,
    node_id bigint NOT NULL,
    version integer NOT NULL,
    fetch_time timestamptz NOT NULL DEFAULT now(),
    peer text NOT NULL DEFAULT ''
);
CREATE INDEX fetches_node ON keys.fetches (node_id, fetch_id);
