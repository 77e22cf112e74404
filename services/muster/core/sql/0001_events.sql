-- The cluster's event log. Writers append un-numbered events (append_id) in the same
-- transaction as their change; numbering passes, serialized by a lock on core.head, give
-- every committed un-numbered event the next revision in append-id order.
CREATE TABLE core.events (
    append_id bigserial PRIMARY KEY,
    revision bigint UNIQUE,
    time timestamptz NOT NULL DEFAULT now(),
    kind text NOT NULL,
    node_id bigint NOT NULL DEFAULT 0,
    payload bytea NOT NULL
);
CREATE INDEX events_unnumbered ON core.events (append_id) WHERE revision IS NULL;

CREATE TABLE core.head (
    id integer PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL,
    -- every event with revision <= compacted_revision is gone
    compacted_revision bigint NOT NULL
);
INSERT INTO core.head VALUES (1, 0, 0);

-- Every replica ticks this row each second; a gap means no replica could reach the database.
CREATE TABLE core.clock (
    id integer PRIMARY KEY CHECK (id = 1),
    last_tick timestamptz NOT NULL
);
INSERT INTO core.clock VALUES (1, now());

CREATE TABLE core.outages (
    id bigserial PRIMARY KEY,
    start_time timestamptz NOT NULL,
    end_time timestamptz NOT NULL,
    credited interval NOT NULL
);

-- Appends an un-numbered event in the caller's transaction (or statement) and returns its
-- append id. Services call this instead of writing core.events themselves, so a change and
-- its event can be one statement.
CREATE FUNCTION core.append_event(kind text, node_id bigint, payload bytea) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    INSERT INTO core.events (kind, node_id, payload) VALUES (kind, node_id, payload) RETURNING append_id
$$;
