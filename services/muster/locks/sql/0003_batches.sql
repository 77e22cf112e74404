-- Lock operations in batches, one round trip each: locks.run() applies a batch of acquires,
-- releases and keep-alives in arrival order inside the caller's statement (autocommit: one
-- commit per batch). Grants, expiries and hand-offs happen here, with their events built here
-- (core.pb_*): the event carries the database's times and the token bumped in the same statement.

-- A waiter is deleted when it is granted; its hold remembers it (so a waiting RPC, on any
-- replica, finds its grant by waiter id).
ALTER TABLE locks.holds ADD COLUMN waiter_id bigint NOT NULL DEFAULT 0;
CREATE INDEX holds_waiter ON locks.holds (waiter_id) WHERE waiter_id <> 0;
DELETE FROM locks.waiters WHERE granted_lease_id IS NOT NULL;
ALTER TABLE locks.waiters DROP COLUMN granted_lease_id;
CREATE INDEX waiters_request ON locks.waiters (request_id) WHERE request_id <> '';

-- One outcome of a batch. i: the operation's place in the batch (1-based), 0 for what the batch
-- caused (an expiry, a grant to a waiter). status: 1 granted, 2 queued, 3 refused (the blocking
-- hold's holder and token; none: a waiter ahead), 4 released, 5 already gone, 6 kept alive,
-- 7 not held, 8 a waiter granted, 9 a hold expired, 10 the events numbered (token: the new head).
CREATE TYPE locks.outcome AS (
    i int,
    status int,
    name text,
    lease_id bigint,
    token bigint,
    mode smallint,
    holder text,
    node_id bigint,
    ttl interval,
    grant_time timestamptz,
    expire_time timestamptz,
    waiter_id bigint,
    now timestamptz
);

CREATE FUNCTION locks.outcome_of(p_i int, p_status int, h locks.holds) RETURNS locks.outcome
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN ROW(p_i, p_status, h.name, h.lease_id, h.token, h.mode, h.holder, h.node_id, h.ttl, h.grant_time,
               h.expire_time, h.waiter_id, now())::locks.outcome;
END $$;

CREATE FUNCTION locks.outcome_bare(p_i int, p_status int, p_name text, p_waiter_id bigint) RETURNS locks.outcome
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN ROW(p_i, p_status, p_name, 0, 0, 0, '', 0, NULL, NULL, NULL, p_waiter_id, now())::locks.outcome;
END $$;

-- muster.api.locks.v1.Lease of a hold.
CREATE FUNCTION locks.lease_pb(h locks.holds) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RETURN core.pb_string(1, h.name) || core.pb_int(2, h.lease_id) || core.pb_int(3, h.token)
        || core.pb_int(4, h.mode) || core.pb_string(5, h.holder) || core.pb_int(6, h.node_id)
        || core.pb_timestamp(7, h.grant_time) || core.pb_timestamp(8, h.expire_time) || core.pb_duration(9, h.ttl);
END $$;

CREATE FUNCTION locks.granted_event(h locks.holds) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO core.events (kind, node_id, payload)
    VALUES ('muster.api.locks.v1.LockGranted', h.node_id,
            core.pb_message(1, locks.lease_pb(h)) || core.pb_int(2, h.waiter_id));
END $$;

CREATE FUNCTION locks.released_event(h locks.holds, reason text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO core.events (kind, node_id, payload)
    VALUES ('muster.api.locks.v1.LockReleased', h.node_id,
            core.pb_message(1, locks.lease_pb(h)) || core.pb_string(2, reason));
END $$;

-- Grants one hold (the caller has locked the lock's row): the fence moves on, the hold and its
-- LockGranted event are written. The hold's times are the clock's now, not the transaction's
-- start: a batch that waited for a row must not hand out a lease already partly spent (the
-- holder's own deadline counts from when it asked, which is earlier still).
CREATE FUNCTION locks.grant(p_name text, p_mode smallint, p_holder text, p_node_id bigint, p_request_id text,
                            p_ttl interval, p_waiter_id bigint) RETURNS locks.holds
LANGUAGE plpgsql AS $$
DECLARE
    v_token bigint;
    h locks.holds;
BEGIN
    UPDATE locks.locks SET fence = fence + 1 WHERE name = p_name RETURNING fence INTO v_token;
    INSERT INTO locks.holds (name, token, mode, holder, node_id, request_id, ttl, grant_time, expire_time, waiter_id)
    VALUES (p_name, v_token, p_mode, p_holder, p_node_id, p_request_id, p_ttl, clock_timestamp(),
            clock_timestamp() + p_ttl, p_waiter_id)
    RETURNING * INTO h;
    PERFORM locks.granted_event(h);
    RETURN h;
END $$;

-- Settles one lock whose row the caller has locked: expired holds go (a LockReleased EXPIRED event
-- each), dead waiters go, then waiters are granted in line while compatible (FIFO: nobody
-- overtakes the first waiter that cannot go). Every statement sees what committed before it, so a
-- keep-alive that committed while this waited for the row keeps its hold.
CREATE FUNCTION locks.settle(p_name text) RETURNS SETOF locks.outcome
LANGUAGE plpgsql AS $$
DECLARE
    h locks.holds;
    w locks.waiters;
    v_exclusive int;
    v_all int;
BEGIN
    FOR h IN DELETE FROM locks.holds d WHERE d.name = p_name AND d.expire_time <= now() RETURNING d.* LOOP
        PERFORM locks.released_event(h, 'EXPIRED');
        RETURN NEXT locks.outcome_of(0, 9, h);
    END LOOP;
    DELETE FROM locks.waiters WHERE name = p_name AND deadline <= now();
    SELECT count(*) FILTER (WHERE mode = 1), count(*) INTO v_exclusive, v_all FROM locks.holds WHERE name = p_name;
    FOR w IN SELECT * FROM locks.waiters WHERE name = p_name ORDER BY waiter_id LOOP
        EXIT WHEN v_exclusive > 0 OR (w.mode = 1 AND v_all > 0);
        h := locks.grant(p_name, w.mode, w.holder, w.node_id, w.request_id, w.ttl, w.waiter_id);
        DELETE FROM locks.waiters WHERE waiter_id = w.waiter_id;
        v_all := v_all + 1;
        IF w.mode = 1 THEN
            v_exclusive := v_exclusive + 1;
        END IF;
        RETURN NEXT locks.outcome_of(0, 8, h);
    END LOOP;
END $$;

-- Applies a batch. ops: 1 acquire (name, mode, holder, node id, request id, ttl, wait), 2 release
-- (lease id, reason), 3 keep-alive (lease id). Every lock row the batch touches is taken first,
-- in name order, in one statement, so batches on any replicas never deadlock; then the operations
-- run in arrival order, each seeing the ones before. An acquire that finds an expired hold settles
-- the lock first; a release grants the waiters it unblocks; what else is due the sweep settles.
CREATE FUNCTION locks.run(p_ops int[], p_names text[], p_ids bigint[], p_modes smallint[], p_holders text[],
                          p_node_ids bigint[], p_request_ids text[], p_ttls interval[], p_waits interval[],
                          p_reasons text[])
RETURNS SETOF locks.outcome
LANGUAGE plpgsql AS $$
DECLARE
    v_names text[];
    v_waiter bigint;
    v_expired int;
    v_queued boolean;
    v_exclusive int;
    v_all int;
    h locks.holds;
BEGIN
    SELECT coalesce(array_agg(x ORDER BY x), '{}') INTO v_names FROM (
        SELECT unnest(p_names) AS x
        UNION
        SELECT hh.name FROM locks.holds hh WHERE hh.lease_id = ANY (p_ids)
    ) s WHERE x <> '';
    INSERT INTO locks.locks AS l (name) SELECT x FROM unnest(v_names) AS x ORDER BY x
    ON CONFLICT (name) DO UPDATE SET fence = l.fence;
    FOR i IN 1 .. coalesce(array_length(p_ops, 1), 0) LOOP
        IF p_ops[i] = 1 THEN
            SELECT count(*) FILTER (WHERE mode = 1), count(*), count(*) FILTER (WHERE expire_time <= now()),
                   EXISTS (SELECT 1 FROM locks.waiters WHERE name = p_names[i])
            INTO v_exclusive, v_all, v_expired, v_queued FROM locks.holds WHERE name = p_names[i];
            IF v_expired > 0 THEN  -- settled first: the expired go, the waiters they blocked may be granted
                RETURN QUERY SELECT * FROM locks.settle(p_names[i]);
                SELECT count(*) FILTER (WHERE mode = 1), count(*),
                       EXISTS (SELECT 1 FROM locks.waiters WHERE name = p_names[i])
                INTO v_exclusive, v_all, v_queued FROM locks.holds WHERE name = p_names[i];
            END IF;
            -- A retried acquire (its first answer was lost) gets its hold or its place in line back.
            -- Only a lock that is held or waited for can have either, so a free one skips the lookup.
            IF p_request_ids[i] <> '' AND (v_all > 0 OR v_queued) THEN
                SELECT * INTO h FROM locks.holds
                WHERE request_id = p_request_ids[i] AND name = p_names[i] AND expire_time > now();
                IF FOUND THEN
                    RETURN NEXT locks.outcome_of(i, 1, h);
                    CONTINUE;
                END IF;
                SELECT waiter_id INTO v_waiter FROM locks.waiters
                WHERE request_id = p_request_ids[i] AND name = p_names[i];
                IF FOUND THEN
                    RETURN NEXT locks.outcome_bare(i, 2, p_names[i], v_waiter);
                    CONTINUE;
                END IF;
            END IF;
            IF NOT v_queued AND (v_all = 0 OR (p_modes[i] = 2 AND v_exclusive = 0)) THEN
                h := locks.grant(p_names[i], p_modes[i], p_holders[i], p_node_ids[i], p_request_ids[i], p_ttls[i], 0);
                RETURN NEXT locks.outcome_of(i, 1, h);
            ELSIF p_waits[i] <= interval '0' THEN
                SELECT * INTO h FROM locks.holds WHERE name = p_names[i] ORDER BY token LIMIT 1;
                IF FOUND THEN
                    RETURN NEXT locks.outcome_of(i, 3, h);
                ELSE
                    RETURN NEXT locks.outcome_bare(i, 3, p_names[i], 0);
                END IF;
            ELSE
                INSERT INTO locks.waiters (name, mode, holder, node_id, request_id, ttl, deadline)
                VALUES (p_names[i], p_modes[i], p_holders[i], p_node_ids[i], p_request_ids[i], p_ttls[i],
                        now() + p_waits[i])
                RETURNING waiter_id INTO v_waiter;
                RETURN NEXT locks.outcome_bare(i, 2, p_names[i], v_waiter);
            END IF;
        ELSIF p_ops[i] = 2 THEN
            DELETE FROM locks.holds WHERE lease_id = p_ids[i] RETURNING * INTO h;
            IF NOT FOUND THEN
                RETURN NEXT locks.outcome_bare(i, 5, '', 0);
                CONTINUE;
            END IF;
            PERFORM locks.released_event(h, p_reasons[i]);
            RETURN NEXT locks.outcome_of(i, 4, h);
            IF EXISTS (SELECT 1 FROM locks.waiters WHERE name = h.name) THEN
                RETURN QUERY SELECT * FROM locks.settle(h.name);
            END IF;
        ELSIF p_ops[i] = 3 THEN
            UPDATE locks.holds SET expire_time = now() + ttl WHERE lease_id = p_ids[i] AND expire_time > now()
            RETURNING * INTO h;
            IF FOUND THEN
                RETURN NEXT locks.outcome_of(i, 6, h);
            ELSE
                RETURN NEXT locks.outcome_bare(i, 7, '', 0);
            END IF;
        ELSE
            RAISE EXCEPTION 'locks.run: unknown operation % at %', p_ops[i], i;
        END IF;
    END LOOP;
    -- The batch's events numbered before its commit (status 10, the new head in token).
    IF EXISTS (SELECT 1 FROM core.events WHERE revision IS NULL) THEN
        RETURN NEXT ROW(0, 10, '', 0, core.number_pending(), 0, '', 0, NULL, NULL, NULL, 0, now())::locks.outcome;
    END IF;
END $$;
