-- A batch of placements in one statement (autocommit: one round trip and one commit per batch).
-- The balancer decides the batch in Python on counts it read without a lock; this function takes
-- the placement lock and checks that what the decisions read still holds — the strategy, the
-- candidates' counts (sessions; placed too under system-load), no placement yet under the batch's
-- request ids. If it holds, the decisions are exactly those a decision under the lock would make:
-- the sessions, the counts and the SessionPlaced events (one multi-row append) are written and the
-- batch's events numbered (core.number_pending, head lock taken last). If not, nothing is written
-- and the current values come back (read under the lock) for the caller to decide again.
CREATE FUNCTION balancer.place(
    p_ids bigint[], p_n integer[], p_pl integer[], p_strategy text, p_request_ids text[],
    s_id text[], s_node bigint[], s_address text[], s_route text[], s_user text[], s_kind text[],
    s_request text[], s_time timestamptz[],
    c_ids bigint[], c_n integer[], c_pl integer[],
    e_payload bytea[],
    OUT placed boolean, OUT strategy text, OUT now timestamptz, OUT ids bigint[], OUT n integer[],
    OUT pl integer[], OUT retried boolean, OUT append_ids bigint[], OUT head bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT s.strategy INTO strategy FROM balancer.settings s WHERE s.id = 1 FOR UPDATE;
    now := now();
    retried := EXISTS (SELECT 1 FROM balancer.sessions x WHERE x.request_id = ANY(p_request_ids));
    placed := strategy = p_strategy AND NOT retried AND NOT EXISTS (
        SELECT 1 FROM unnest(p_ids, p_n, p_pl) AS e(id, n, pl)
        LEFT JOIN balancer.node_counts c ON c.node_id = e.id
        WHERE coalesce(c.sessions, 0) <> e.n OR (p_strategy = 'system-load' AND coalesce(c.placed, 0) <> e.pl)
    );
    IF NOT placed THEN
        SELECT array_agg(c.node_id), array_agg(c.sessions), array_agg(c.placed) INTO ids, n, pl
        FROM balancer.node_counts c WHERE c.node_id = ANY(p_ids);
        RETURN;
    END IF;
    INSERT INTO balancer.sessions (id, node_id, node_address, route, user_name, kind, state, request_id, place_time)
    SELECT * FROM unnest(s_id, s_node, s_address, s_route, s_user, s_kind, array_fill(1::smallint, ARRAY[cardinality(s_id)]),
                         s_request, s_time);
    INSERT INTO balancer.node_counts AS c (node_id, sessions, placed)
    SELECT * FROM unnest(c_ids, c_n, c_pl)
    ON CONFLICT (node_id) DO UPDATE SET sessions = c.sessions + EXCLUDED.sessions, placed = c.placed + EXCLUDED.placed;
    WITH appended AS (
        INSERT INTO core.events (kind, node_id, payload)
        SELECT 'muster.api.balancer.v1.SessionPlaced', u.node, u.payload
        FROM unnest(s_node, e_payload) WITH ORDINALITY AS u(node, payload, i) ORDER BY u.i
        RETURNING append_id
    )
    SELECT array_agg(a.append_id ORDER BY a.append_id) INTO append_ids FROM appended a;
    head := core.number_pending();
END
$$;
