-- Fencing tokens across a database failover: a grant moves the fence past the current epoch's
-- floor (core.epoch_floor(), core 0003), so a token handed out on a new timeline is higher than
-- any handed out on an earlier one, including grants the new primary never received.
CREATE OR REPLACE FUNCTION locks.grant(p_name text, p_mode smallint, p_holder text, p_node_id bigint,
                                       p_request_id text, p_ttl interval, p_waiter_id bigint) RETURNS locks.holds
LANGUAGE plpgsql AS $$
DECLARE
    v_token bigint;
    h locks.holds;
BEGIN
    UPDATE locks.locks SET fence = greatest(fence, core.epoch_floor()) + 1 WHERE name = p_name
    RETURNING fence INTO v_token;
    INSERT INTO locks.holds (name, token, mode, holder, node_id, request_id, ttl, grant_time, expire_time, waiter_id)
    VALUES (p_name, v_token, p_mode, p_holder, p_node_id, p_request_id, p_ttl, clock_timestamp(),
            clock_timestamp() + p_ttl, p_waiter_id)
    RETURNING * INTO h;
    PERFORM locks.granted_event(h);
    RETURN h;
END $$;

-- A new epoch drops every waiter: a waiter row that survived the failover may belong to a client
-- that was granted (and moved on) on the old primary, whose grant and the waiter's deletion were
-- lost; granted again here, it would hold the lock for nobody until its TTL. A client still
-- waiting finds its waiter gone and asks again (the replica answers it STORE_UNAVAILABLE).
CREATE FUNCTION locks.on_new_epoch() RETURNS void
LANGUAGE sql AS $$
    DELETE FROM locks.waiters
$$;
INSERT INTO core.epoch_hooks (fn) VALUES ('locks.on_new_epoch');
