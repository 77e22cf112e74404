CREATE SCHEMA registry;

CREATE TABLE registry.cluster (
    id integer PRIMARY KEY CHECK (id = 1),
    uid uuid NOT NULL DEFAULT gen_random_uuid(),
    epoch bigint NOT NULL DEFAULT 1,
    create_time timestamptz NOT NULL DEFAULT now()
);
INSERT INTO registry.cluster (id) VALUES (1);

CREATE SEQUENCE registry.lease_ids;

-- state: Node.State numbers; mode: Node.Mode; health: Node.Health (stored by the reaper).
CREATE TABLE registry.nodes (
    id bigserial PRIMARY KEY,
    address text NOT NULL UNIQUE,
    host text NOT NULL,
    port integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    ipv4 text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}',
    state smallint NOT NULL,
    state_reason text NOT NULL DEFAULT '',
    mode smallint NOT NULL DEFAULT 1,
    health smallint NOT NULL DEFAULT 0,
    lease_id bigint NOT NULL,
    join_request_id text NOT NULL DEFAULT '',
    create_time timestamptz NOT NULL DEFAULT now(),
    state_time timestamptz NOT NULL DEFAULT now(),
    last_seen_time timestamptz NOT NULL DEFAULT now(),
    check_in_deadline timestamptz NOT NULL,
    lease_expire_time timestamptz NOT NULL,
    load1 double precision NOT NULL DEFAULT 0,
    load5 double precision NOT NULL DEFAULT 0,
    load15 double precision NOT NULL DEFAULT 0,
    cpu_count integer NOT NULL DEFAULT 0,
    session_count integer NOT NULL DEFAULT 0
);
CREATE INDEX nodes_online_deadline ON registry.nodes (lease_expire_time) WHERE state = 2;

-- The last core.outages id whose credit was applied to the registry's leases.
CREATE TABLE registry.outage_marker (
    id integer PRIMARY KEY CHECK (id = 1),
    last_outage_id bigint NOT NULL
);
INSERT INTO registry.outage_marker VALUES (1, 0);
