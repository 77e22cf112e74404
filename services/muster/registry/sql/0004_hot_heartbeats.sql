-- Heartbeats rewrite last_seen_time, check_in_deadline and lease_expire_time of every ONLINE node
-- every interval. With lease_expire_time indexed, each of those UPDATEs wrote a new index entry
-- (no HOT update); without it, and with room left on each page, a heartbeat is a HOT update that
-- touches only the heap page. The reaper's sweep needs no index: it already visits every ONLINE
-- row for the check-in test (SWEEP_HEALTH), and the expiry test is one more pass over the same
-- few pages (10,000 nodes: about 1 ms).
DROP INDEX registry.nodes_online_deadline;
ALTER TABLE registry.nodes SET (fillfactor = 70);
