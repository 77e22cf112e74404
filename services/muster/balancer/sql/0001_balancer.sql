CREATE SCHEMA balancer;

-- The cluster's placement strategy. Its row is also the placement lock: every placement batch and
-- every move takes it FOR UPDATE, so decisions see each other's reservations.
CREATE TABLE balancer.settings (
    id integer PRIMARY KEY CHECK (id = 1),
    strategy text NOT NULL DEFAULT 'sessions',
    update_time timestamptz NOT NULL DEFAULT now()
);
INSERT INTO balancer.settings (id) VALUES (1);

-- state: 1 PLACED (reserved, not started), 2 STARTED.
CREATE TABLE balancer.sessions (
    id text PRIMARY KEY,
    node_id bigint NOT NULL,
    node_address text NOT NULL,
    route text NOT NULL,
    user_name text NOT NULL,
    kind text NOT NULL DEFAULT '',
    state smallint NOT NULL,
    pid integer NOT NULL DEFAULT 0,
    request_id text NOT NULL DEFAULT '',
    place_time timestamptz NOT NULL DEFAULT now(),
    start_time timestamptz,
    moved_from text NOT NULL DEFAULT ''
);
CREATE INDEX sessions_node ON balancer.sessions (node_id, place_time);
CREATE UNIQUE INDEX sessions_request ON balancer.sessions (request_id) WHERE request_id <> '';
CREATE INDEX sessions_placed ON balancer.sessions (place_time) WHERE state = 1;

-- Sessions per node (placed and started), kept in the transactions that change them.
CREATE TABLE balancer.node_counts (
    node_id bigint PRIMARY KEY,
    sessions integer NOT NULL DEFAULT 0,
    placed integer NOT NULL DEFAULT 0
);

-- Old session id -> new id, for RouteSession on an id issued before a move.
CREATE TABLE balancer.moves (
    old_id text PRIMARY KEY,
    new_id text NOT NULL,
    move_time timestamptz NOT NULL DEFAULT now()
);

-- Takes the placement lock, then reads what a batch's decisions need. A function, so that the
-- reads run after the lock is granted, each with a fresh snapshot (READ COMMITTED): one statement
-- would read with the snapshot it started with, before the lock, and miss the batch that held it.
CREATE FUNCTION balancer.lock_for_placement(node_ids bigint[], request_ids text[],
    OUT strategy text, OUT now timestamptz, OUT ids bigint[], OUT n integer[], OUT pl integer[], OUT retried boolean)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT s.strategy INTO strategy FROM balancer.settings s WHERE s.id = 1 FOR UPDATE;
    now := now();
    SELECT array_agg(c.node_id), array_agg(c.sessions), array_agg(c.placed) INTO ids, n, pl
    FROM balancer.node_counts c WHERE c.node_id = ANY(node_ids);
    retried := EXISTS (SELECT 1 FROM balancer.sessions x WHERE x.request_id = ANY(request_ids));
END
$$;
