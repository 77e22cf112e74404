-- Epochs across a database failover. A promoted standby (or a restore from a backup) runs on a
-- new PostgreSQL timeline, and with asynchronous replication it may lack the old primary's last
-- commits: revisions and fencing tokens handed out there could be handed out again with other
-- content. So the first writer on a new timeline opens a new epoch: from then on every revision
-- and every fencing token is above `timeline << 40`, higher than anything numbered on an earlier
-- timeline (timelines only grow, and a timeline numbers fewer than 2^40 of either). A watcher whose
-- resume point is below the epoch's floor gets a Resync, never events that may have been lost or
-- renumbered; ids from Muster's sequences jump past the floor as well. The first epoch (the
-- timeline the cluster was created on) has floor 0.
ALTER TABLE core.head
    ADD COLUMN timeline bigint,
    ADD COLUMN epoch_floor bigint NOT NULL DEFAULT 0;

CREATE TABLE core.epochs (
    timeline bigint PRIMARY KEY,
    floor bigint NOT NULL,
    -- the head the new primary had when the epoch opened: what survived of the one before
    survived_revision bigint NOT NULL,
    start_time timestamptz NOT NULL DEFAULT now()
);

-- What each service does when an epoch opens (its migration registers a function of no
-- arguments): state whose meaning was tied to the old primary's last moments goes, before anything
-- is written on the new timeline.
CREATE TABLE core.epoch_hooks (
    fn text PRIMARY KEY
);

-- The timeline WAL is written on now (only a primary can answer; a standby raises).
CREATE FUNCTION core.timeline() RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
$$;

UPDATE core.head SET timeline = core.timeline();
INSERT INTO core.epochs (timeline, floor, survived_revision) SELECT timeline, 0, revision FROM core.head;
ALTER TABLE core.head ALTER COLUMN timeline SET NOT NULL;

-- The current epoch's floor; on a new timeline, opens its epoch first (the head jumps to the new
-- floor). Called by everything that hands out revisions or tokens, after the rows it locks and
-- before the head lock (the fixed order), so nothing is numbered on a new timeline before the jump.
CREATE FUNCTION core.epoch_floor() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_timeline bigint := core.timeline();
    v_seen bigint;
    v_floor bigint;
    v_head bigint;
    v_hook text;
BEGIN
    SELECT timeline, epoch_floor INTO v_seen, v_floor FROM core.head WHERE id = 1;
    IF v_seen = v_timeline THEN
        RETURN v_floor;
    END IF;
    SELECT revision INTO v_head FROM core.head WHERE id = 1 FOR UPDATE;
    SELECT timeline, epoch_floor INTO v_seen, v_floor FROM core.head WHERE id = 1;
    IF v_seen = v_timeline THEN  -- another writer opened it while we waited for the row
        RETURN v_floor;
    END IF;
    v_floor := greatest(v_floor, v_timeline << 40);
    UPDATE core.head SET timeline = v_timeline, epoch_floor = v_floor, revision = greatest(revision, v_floor)
    WHERE id = 1;
    INSERT INTO core.epochs (timeline, floor, survived_revision) VALUES (v_timeline, v_floor, v_head)
    ON CONFLICT (timeline) DO NOTHING;
    -- Ids jump too (node, lease, waiter, session ids): an id handed out on the old primary and lost
    -- must never name something else here (a stale holder's release must not free another's lock).
    PERFORM setval(format('%I.%I', s.schemaname, s.sequencename), greatest(coalesce(s.last_value, 0), v_floor))
    FROM pg_sequences s
    WHERE s.schemaname IN (SELECT component FROM core.migrations) AND coalesce(s.last_value, 0) < v_floor;
    FOR v_hook IN SELECT fn FROM core.epoch_hooks ORDER BY fn LOOP
        EXECUTE format('SELECT %s()', v_hook);
    END LOOP;
    RAISE LOG 'muster: timeline % (a failover or a restore): epoch opened at revision %, % survived',
        v_timeline, v_floor, v_head;
    RETURN v_floor;
END $$;

-- The head as a replica's event bus reads it, on the current epoch.
CREATE FUNCTION core.read_head(OUT revision bigint, OUT compacted_revision bigint, OUT now timestamptz,
                               OUT pending boolean, OUT epoch_floor bigint)
LANGUAGE plpgsql AS $$
BEGIN
    epoch_floor := core.epoch_floor();
    SELECT h.revision, h.compacted_revision, now(), EXISTS (SELECT 1 FROM core.events WHERE events.revision IS NULL)
    INTO revision, compacted_revision, now, pending
    FROM core.head h WHERE h.id = 1;
END $$;

-- One numbering pass of at most p_limit events (the caller holds the head lock).
CREATE FUNCTION core.number_some(p_limit int, OUT revision bigint, OUT numbered bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM core.epoch_floor();
    WITH pending AS (
        SELECT append_id, row_number() OVER (ORDER BY append_id) AS n
        FROM core.events WHERE events.revision IS NULL ORDER BY append_id LIMIT p_limit
    ), h AS (
        SELECT head.revision FROM core.head WHERE id = 1
    ), done AS (
        UPDATE core.events e SET revision = h.revision + p.n
        FROM pending p, h WHERE e.append_id = p.append_id
        RETURNING e.revision
    )
    UPDATE core.head SET revision = head.revision + (SELECT count(*) FROM done)
    WHERE id = 1
    RETURNING head.revision, (SELECT count(*) FROM done) INTO revision, numbered;
END $$;

-- The writer's in-transaction numbering (core 0002), now on the current epoch: one pass of
-- core.number_some with no limit, the head lock taken last as before.
CREATE OR REPLACE FUNCTION core.number_pending() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_head bigint;
    v_numbered bigint;
BEGIN
    LOCK TABLE core.head IN EXCLUSIVE MODE;
    SELECT n.revision, n.numbered INTO v_head, v_numbered FROM core.number_some(2147483647) n;
    IF v_numbered > 0 THEN
        PERFORM pg_notify('muster_events', v_head::text);
    END IF;
    RETURN v_head;
END $$;
