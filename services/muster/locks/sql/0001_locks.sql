CREATE SCHEMA locks;

-- One row per lock name ever used; never deleted, so fencing tokens keep increasing.
CREATE TABLE locks.locks (
    name text PRIMARY KEY,
    fence bigint NOT NULL DEFAULT 0
);

CREATE SEQUENCE locks.lease_ids;

-- mode: 1 exclusive, 2 shared (LockMode numbers).
CREATE TABLE locks.holds (
    lease_id bigint PRIMARY KEY DEFAULT nextval('locks.lease_ids'),
    name text NOT NULL REFERENCES locks.locks (name),
    token bigint NOT NULL,
    mode smallint NOT NULL,
    holder text NOT NULL,
    node_id bigint NOT NULL DEFAULT 0,
    request_id text NOT NULL DEFAULT '',
    ttl interval NOT NULL,
    grant_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NOT NULL
);
CREATE INDEX holds_name ON locks.holds (name);
CREATE INDEX holds_expire ON locks.holds (expire_time);
CREATE INDEX holds_node ON locks.holds (node_id) WHERE node_id <> 0;
CREATE INDEX holds_request ON locks.holds (request_id) WHERE request_id <> '';

-- Waiters are served in waiter_id order; granted_lease_id is set by the transaction that grants.
CREATE TABLE locks.waiters (
    waiter_id bigserial PRIMARY KEY,
    name text NOT NULL REFERENCES locks.locks (name),
    mode smallint NOT NULL,
    holder text NOT NULL,
    node_id bigint NOT NULL DEFAULT 0,
    request_id text NOT NULL DEFAULT '',
    ttl interval NOT NULL,
    enqueue_time timestamptz NOT NULL DEFAULT now(),
    deadline timestamptz NOT NULL,
    granted_lease_id bigint
);
CREATE INDEX waiters_name ON locks.waiters (name, waiter_id);

-- state: Firing.State numbers.
CREATE TABLE locks.firings (
    job text NOT NULL,
    scheduled_time timestamptz NOT NULL,
    holder text NOT NULL,
    node_id bigint NOT NULL DEFAULT 0,
    token bigint NOT NULL,
    state smallint NOT NULL,
    recoverable boolean NOT NULL,
    attempt integer NOT NULL DEFAULT 1,
    claim_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz NOT NULL,
    complete_time timestamptz,
    PRIMARY KEY (job, scheduled_time)
);
CREATE INDEX firings_claimed ON locks.firings (expire_time) WHERE state = 1;

CREATE TABLE locks.outage_marker (
    id integer PRIMARY KEY CHECK (id = 1),
    last_outage_id bigint NOT NULL
);
INSERT INTO locks.outage_marker VALUES (1, 0);
