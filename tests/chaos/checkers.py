"""Checkers over a run's history and the database's final state.

Each returns a :class:`Verdict`: ok or not, a one-line summary, and for each violation a minimal
counter-example (the offending records, as recorded). A checker judges only what the guarantee
promises (DESIGN.md, README.md); what a fault merely explains (a slot not run while the database
was down) is a note, not a violation.
"""

from __future__ import annotations

import base64
import bisect
import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .history import Run, decode

MAX_EXAMPLES = 5
MOVE_LAG = 1.0  # a move onto a node that left this long before (by the stream) is counted
SWEEP_SLACK = 3.0  # the balancer sweeps every 2 s: a node eligible this long must have received moved sessions
STATE_NAMES = {
    1: "STARTING",
    2: "ONLINE",
    3: "OFFLINE",
    4: "DELETING",
    5: "FAILED_TO_RESOLVE",
    6: "INVALID_SECURE_COOKIE_KEY",
    7: "INVALID_KEY_PERMISSIONS",
    8: "ERROR_READING_LAUNCHER_KEY",
    9: "INVALID_LAUNCHER_KEY",
    10: "INVALID_LICENSE",
}
MODE_NAMES = {1: "ACTIVE", 2: "DRAINING"}
HEALTH_NAMES = {0: "NONE", 1: "OK", 2: "MISSED_CHECK_IN"}


@dataclass
class Verdict:
    """One checker's result."""

    name: str
    ok: bool = True
    summary: str = ""
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def fail(self, what: str, *records: Any) -> None:
        """Adds a violation with its counter-example (the records that show it)."""
        self.ok = False
        if len(self.violations) >= MAX_EXAMPLES * 4:
            return
        lines = [what, *("    " + _show(r) for r in records)]
        self.violations.append("\n".join(lines))

    def report(self) -> str:
        head = f"{'PASS' if self.ok else 'FAIL'} {self.name}: {self.summary}"
        body = []
        for v in self.violations[:MAX_EXAMPLES]:
            body.append("  - " + v.replace("\n", "\n    "))
        if len(self.violations) > MAX_EXAMPLES:
            body.append(f"  … and {len(self.violations) - MAX_EXAMPLES} more")
        body += ["  note: " + n for n in self.notes[:8]]
        if len(self.notes) > 8:
            body.append(f"  … and {len(self.notes) - 8} more notes")
        return "\n".join([head, *body])


def _show(r: Any) -> str:
    if isinstance(r, dict):
        r = {k: v for k, v in r.items() if k != "nodes"} | ({"nodes": "…"} if "nodes" in r else {})
        return json.dumps(r, default=str, sort_keys=True)
    return str(r)


def _ts(ts: Any) -> str:
    """A protobuf Timestamp as ISO-8601 UTC (empty when unset)."""
    return ts.ToDatetime().isoformat() + "Z" if ts.seconds or ts.nanos else ""


def short(kind: str) -> str:
    return kind.rsplit(".", 1)[-1]


# -- the event log, replayed ---------------------------------------------------------------------


@dataclass
class Replay:
    """The database's event log replayed: each node's state after every revision, and the sessions."""

    events: list[dict[str, Any]]
    by_rev: dict[int, dict[str, Any]] = field(default_factory=dict)
    # node -> [(revision, (state, mode, health) or None when deleted)]
    node_changes: dict[int, list[tuple[int, tuple[str, str, str] | None]]] = field(default_factory=dict)
    # (revision, node, sessions on it then, the event) for every node leaving ONLINE or deleted
    deaths: list[tuple[int, int, list[str], dict[str, Any]]] = field(default_factory=list)
    moves: list[dict[str, Any]] = field(default_factory=list)
    ended: dict[str, int] = field(default_factory=dict)
    session_node: dict[str, int] = field(default_factory=dict)
    session_since: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, events: list[dict[str, Any]]) -> Replay:
        self = cls(events)
        state: dict[int, tuple[str, str, str]] = {}
        on_node: dict[int, set[str]] = defaultdict(set)
        for ev in events:
            rev, kind = ev["revision"], short(ev["kind"])
            self.by_rev[rev] = ev
            msg = decode(ev["kind"], ev["payload"])
            ev["short"] = kind
            if kind in ("NodeJoined", "NodeStateChanged", "NodeSuspected", "NodeRecovered") and msg is not None:
                n = msg.node
                before = state.get(n.id)
                after = (
                    STATE_NAMES.get(n.state, str(n.state)),
                    MODE_NAMES.get(n.mode, "?"),
                    HEALTH_NAMES.get(n.health, "?"),
                )
                ev["node_state"] = after
                state[n.id] = after
                self.node_changes.setdefault(n.id, []).append((rev, after))
                if after[0] != "ONLINE" and (before is None or before[0] == "ONLINE"):
                    self.deaths.append((rev, n.id, sorted(on_node[n.id]), ev))
            elif kind == "NodeModeChanged" and msg is not None:
                before = state.get(msg.node_id)
                if before is not None:
                    after = (before[0], MODE_NAMES.get(msg.mode, "?"), before[2])
                    state[msg.node_id] = after
                    self.node_changes.setdefault(msg.node_id, []).append((rev, after))
                ev["mode"] = MODE_NAMES.get(msg.mode, "?")
            elif kind == "NodeDeleted" and msg is not None:
                if msg.node_id in state and state[msg.node_id][0] == "ONLINE":
                    self.deaths.append((rev, msg.node_id, sorted(on_node[msg.node_id]), ev))
                state.pop(msg.node_id, None)
                self.node_changes.setdefault(msg.node_id, []).append((rev, None))
            elif kind in ("SessionPlaced", "SessionStarted") and msg is not None:
                s = msg.session
                old = self.session_node.get(s.id)
                if old is not None and old != s.node_id:
                    on_node[old].discard(s.id)
                if s.id not in self.session_node:
                    self.session_since[s.id] = rev
                self.session_node[s.id] = s.node_id
                on_node[s.node_id].add(s.id)
                ev["sid"], ev["snode"] = s.id, s.node_id
            elif kind == "SessionEnded" and msg is not None:
                node = self.session_node.pop(msg.session_id, msg.node_id)
                on_node[node].discard(msg.session_id)
                self.ended[msg.session_id] = rev
            elif kind == "SessionMoved" and msg is not None:
                rec = {
                    "rev": rev,
                    "sid": msg.session.id,
                    "snode": msg.session.node_id,
                    "prev": msg.previous_id,
                    "pnode": msg.previous_node_id,
                    "was_on": self.session_node.get(msg.previous_id),
                    "since": self.session_since.get(msg.previous_id),
                }
                self.moves.append(rec)
                old = self.session_node.pop(msg.previous_id, msg.previous_node_id)
                on_node[old].discard(msg.previous_id)
                self.session_node[msg.session.id] = msg.session.node_id
                self.session_since[msg.session.id] = rev
                on_node[msg.session.node_id].add(msg.session.id)
                ev["sid"], ev["prev"] = msg.session.id, msg.previous_id
        return self

    def node_at(self, node: int, rev: int) -> tuple[str, str, str] | None:
        """The node's (state, mode, health) after revision ``rev`` (None: unknown or deleted)."""
        changes = self.node_changes.get(node, [])
        i = bisect.bisect_right([r for r, _ in changes], rev) - 1
        return changes[i][1] if i >= 0 else None

    def eligible_elsewhere(self, node: int, rev: int) -> tuple[int | None, float]:
        """After ``node`` died at ``rev``: the revision it came back ONLINE (None: never), and the longest
        stretch of time (by the events' database times) in between during which another node was eligible."""
        back = next((r for r, st in self.node_changes.get(node, []) if r > rev and st and st[0] == "ONLINE"), None)
        end_rev = back if back is not None else (self.events[-1]["revision"] if self.events else rev)
        states = {n: self.node_at(n, rev) for n in self.node_changes if n != node}
        points = sorted(
            (r, n, st) for n, ch in self.node_changes.items() if n != node for r, st in ch if rev < r <= end_rev
        )

        def time_of(r: int) -> float:
            return float(self.by_rev[r]["time"]) if r in self.by_rev else 0.0

        longest, since = 0.0, (time_of(rev) if any(eligible(s) for s in states.values()) else None)
        for r, n, st in points:
            states[n] = st
            ok = any(eligible(s) for s in states.values())
            if ok and since is None:
                since = time_of(r)
            elif not ok and since is not None:
                longest, since = max(longest, time_of(r) - since), None
        if since is not None:
            longest = max(longest, time_of(end_rev) - since)
        return back, longest

    def changes_between(self, node: int, lo: int, hi: int) -> list[tuple[int, tuple[str, str, str] | None]]:
        """The node's changes with lo < revision < hi."""
        return [(r, s) for r, s in self.node_changes.get(node, []) if lo < r < hi]


def eligible(s: tuple[str, str, str] | None) -> bool:
    """Whether a node in this (state, mode, health) may receive a new session."""
    return s is not None and s[0] == "ONLINE" and s[1] == "ACTIVE" and s[2] != "MISSED_CHECK_IN"


def _faults_overlapping(run: Run, lo: float, hi: float, kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The faults injected at some time between lo and hi (the standing clock skew left out)."""
    return [
        f
        for f in run.faults
        if f["start"] < hi
        and f["end"] > lo
        and not f["kind"].startswith("clock_skew")
        and (kinds is None or f["kind"] in kinds)
    ]


# -- event stream --------------------------------------------------------------------------------


def check_stream(run: Run) -> Verdict:
    v = Verdict("event stream")
    final = run.final
    events = final.get("events", [])
    db = {e["revision"]: e for e in events}
    head = final.get("head_revision") or 0
    if not final:
        v.fail("no final database state was recorded")
        return v
    # The log itself: gap-free inside each epoch, none left un-numbered. A failover opens a new epoch
    # (README "PostgreSQL high availability"): its revisions start above timeline << 40, so the log
    # jumps from what survived of the epoch before to the new floor. That jump is the guarantee, not a
    # hole: inside an epoch every revision is present, and nothing is numbered between two epochs.
    epochs = _epochs(final, head)
    floors = [lo for lo, _ in epochs]
    for lo, hi in epochs:
        present = sum(1 for r in db if lo < r <= hi)
        if present == hi - lo:
            continue
        if hi - lo > len(db) + 10_000:
            v.fail(f"the epoch from revision {lo + 1} to {hi} spans {hi - lo} revisions; the log holds {present}")
            continue
        missing = [r for r in range(lo + 1, hi + 1) if r not in db][:10]
        v.fail(f"the event log has holes: revisions {missing} are missing in the epoch {lo + 1}..{hi}")
    outside = sorted(r for r in db if not any(lo < r <= hi for lo, hi in epochs))
    if outside:
        v.fail(f"revisions outside every epoch (between an epoch's survivors and the next floor): {outside[:10]}")
    if final.get("unnumbered", [{"n": 0}])[0]["n"]:
        v.fail(f"{final['unnumbered'][0]['n']} committed events were never numbered")
    checked = 0
    for name, recs in run.role("watch").items():
        cfg = run.client(name)
        kinds = set(cfg.get("kinds") or [])
        if cfg.get("mode") == "raw":
            _check_raw_stream(v, name, recs, db)
        seen, segments = _check_delivery(v, name, recs, db, bool(kinds), floors)
        fin = next((r for r in recs if r.get("op") == "final"), None)
        if fin is None:
            v.fail(f"{name}: no final record (the watcher died or was killed)", *recs[-3:])
            continue
        if fin.get("timed_out") or (fin.get("stop_at") is not None and fin["through"] < fin["stop_at"]):
            v.fail(
                f"{name}: never reached the final revision {fin.get('stop_at')} after every fault was healed "
                f"(stuck at through_revision {fin['through']})",
                *recs[-3:],
            )
        through = fin["through"]
        # Coverage: every event of the log that matches the filter, up to through_revision, was seen.
        expected = {
            r
            for r in db
            if r <= through and any(lo < r <= hi for lo, hi in segments) and (not kinds or db[r]["kind"] in kinds)
        }
        lost = sorted(expected - seen)
        if lost:
            v.fail(
                f"{name}: {len(lost)} events up to its through_revision {through} never delivered (first: {lost[:8]})",
                *[{"rev": r, "kind": db[r]["kind"], "node": db[r]["node_id"]} for r in lost[:3]],
            )
        leaked = sorted(r for r in seen if kinds and r in db and db[r]["kind"] not in kinds)
        if leaked:
            v.fail(f"{name}: delivered events its filter excludes: {leaked[:8]}")
        # The final view equals the database's nodes at that revision.
        _check_final_view(v, name, fin, final)
        checked += 1
    if checked == 0:
        v.fail("no watcher history")
    v.summary = f"{checked} watchers, log head {head}, {len(events)} events" + (
        f", {len(epochs)} epochs (floors {', '.join(str(f) for f in floors)})" if len(epochs) > 1 else ""
    )
    return v


def _epochs(final: dict[str, Any], head: int) -> list[tuple[int, int]]:
    """The epochs of the final log as (floor, last revision): each ends where what survived of it on
    the next epoch's primary ends (``core.epochs.survived_revision``), the last at the head. A run
    recorded before epochs (or without a failover) is one epoch from 0."""
    rows = sorted(final.get("epochs") or [{"floor": 0, "survived_revision": 0}], key=lambda e: e["floor"])
    if rows[0]["floor"] != 0:
        rows.insert(0, {"floor": 0, "survived_revision": 0})
    out = []
    for i, e in enumerate(rows):
        end = rows[i + 1]["survived_revision"] if i + 1 < len(rows) else head
        out.append((int(e["floor"]), int(end)))
    return out


def _epoch_of(floors: list[int], rev: int, *, resync: bool = False) -> int:
    """The index of the epoch a revision belongs to (an event above its floor; a Resync's revision
    may be the floor itself: a new epoch's head before its first event)."""
    return (bisect.bisect_right(floors, rev) if resync else bisect.bisect_left(floors, rev)) - 1


def _check_delivery(
    v: Verdict,
    name: str,
    recs: list[dict[str, Any]],
    db: dict[int, dict[str, Any]],
    filtered: bool,
    floors: list[int] | None = None,
) -> tuple[set[int], list[tuple[int, int]]]:
    """In order, no duplicates, no gaps (unfiltered), content as in the log; a watcher crosses into a
    new epoch only through a Resync at or above its floor (filtered or not). Returns the revisions seen
    and the segments (after each Resync) they cover."""
    floors = floors or [0]
    epoch, epoch_rec = None, None
    last, last_rec = None, None
    seen: set[int] = set()
    segments: list[list[int]] = []
    by_conn = any(r.get("op") == "connect" for r in recs)
    for r in recs:
        op = r.get("op")
        if op == "connect":
            continue
        if op == "resync":
            if last is not None and r["rev"] < last:
                v.fail(f"{name}: a Resync went back in time ({r['rev']} after revision {last})", last_rec, r)
            last, last_rec = r["rev"], r
            segments.append([r["rev"], r["rev"]])
            if not by_conn:
                epoch, epoch_rec = _epoch_of(floors, r["rev"], resync=True), r
        elif op == "event":
            rev = r["rev"]
            if not by_conn:  # (the raw stream: per connection, in _check_raw_stream)
                e = _epoch_of(floors, rev)
                if epoch is not None and e > epoch:
                    v.fail(
                        f"{name}: revision {rev} of the epoch from {floors[e] + 1} delivered without a Resync "
                        f"after the earlier epoch's revisions (a failover must resync a watcher behind the floor)",
                        epoch_rec,
                        r,
                    )
                if epoch is None or e > epoch:
                    epoch, epoch_rec = e, r
            if by_conn:
                pass  # the raw stream's order is checked per connection; a replay after a reconnect is legal there
            elif last is not None and rev <= last:
                v.fail(f"{name}: revision {rev} delivered after {last} (duplicate or out of order)", last_rec, r)
            elif last is not None and not filtered and rev != last + 1:
                v.fail(f"{name}: gap: revisions {last + 1}..{rev - 1} skipped", last_rec, r)
            ev = db.get(rev)
            if ev is None:
                v.fail(f"{name}: revision {rev} is not in the database's log", r)
            elif short(ev["kind"]) != r["kind"] or ev["node_id"] != r["node"]:
                v.fail(f"{name}: revision {rev} differs from the log's ({ev['kind']}, node {ev['node_id']})", r)
            if rev in seen and not by_conn:
                continue
            seen.add(rev)
            if last is None or rev > last:
                last, last_rec = rev, r
            if segments:
                segments[-1][1] = max(segments[-1][1], rev)
        elif op == "progress" and not filtered and not by_conn:
            if last is not None and r["through"] > last:
                v.fail(
                    f"{name}: progress through {r['through']} but the last revision delivered is {last}", last_rec, r
                )
        if op in ("progress", "batch", "final") and segments and "through" in r:
            segments[-1][1] = max(segments[-1][1], r["through"])
    return seen, [(lo, hi) for lo, hi in segments]


def _check_raw_stream(v: Verdict, name: str, recs: list[dict[str, Any]], db: dict[int, dict[str, Any]]) -> None:
    """The server's own promise, per stream: events after start_revision, consecutive, each once;
    through_revision never goes back; a resumed stream continues where the last one stopped."""
    revs = sorted(db)
    conn_last: dict[int, int] = {}
    conn_rec: dict[int, dict[str, Any]] = {}
    conn_through: dict[int, int] = {}
    for r in recs:
        op, c = r.get("op"), r.get("conn")
        if op == "connect":
            conn_last[c] = r["start"]
            conn_rec[c] = r
            conn_through[c] = r["start"]
        elif op == "resync":
            conn_last[c] = r["rev"]
            conn_rec[c] = r
        elif op == "event":
            last = conn_last.get(c, 0)
            if r["rev"] <= last:
                v.fail(
                    f"{name}: the server sent revision {r['rev']} on a stream already past {last} "
                    "(duplicate, or at or before start_revision)",
                    conn_rec.get(c),
                    r,
                )
            elif r["rev"] != last + 1:
                v.fail(
                    f"{name}: the server skipped revisions {last + 1}..{r['rev'] - 1} on one stream", conn_rec.get(c), r
                )
            conn_last[c], conn_rec[c] = max(last, r["rev"]), r
        elif op in ("batch", "progress"):
            if r["through"] < conn_through.get(c, 0):
                v.fail(f"{name}: through_revision went back from {conn_through[c]} to {r['through']}", r)
            if op == "batch" and r["through"] < conn_last.get(c, 0):
                v.fail(f"{name}: a batch's through_revision {r['through']} is below its events", r)
            if op == "progress" and r["through"] > conn_last.get(c, 0) and r["through"] > conn_through.get(c, 0):
                # Unfiltered: a progress mark may not claim revisions the stream never sent.
                if bisect.bisect_right(revs, r["through"]) > bisect.bisect_right(revs, conn_last.get(c, 0)):
                    v.fail(
                        f"{name}: progress through {r['through']} but the stream sent only up to {conn_last.get(c, 0)}",
                        conn_rec.get(c),
                        r,
                    )
            conn_through[c] = max(conn_through.get(c, 0), r["through"])
            conn_last[c] = max(conn_last.get(c, 0), r["through"])


def _db_nodes(rows: list[dict[str, Any]]) -> list[list[Any]]:
    return sorted(
        [
            r["id"],
            r["address"],
            STATE_NAMES.get(r["state"], str(r["state"])),
            MODE_NAMES.get(r["mode"], "?"),
            HEALTH_NAMES.get(r["health"], "?"),
            r["lease_id"],
        ]
        for r in rows
    )


def _check_final_view(v: Verdict, name: str, fin: dict[str, Any], final: dict[str, Any]) -> None:
    through = fin["through"]
    for snap in final.get("views", []):
        if snap["head_revision"] == through and snap.get("consistent"):
            want = _db_nodes(snap["nodes"])
            got = sorted(fin["nodes"])
            if want != got:
                diff_db = [n for n in want if n not in got]
                diff_w = [n for n in got if n not in want]
                v.fail(
                    f"{name}: its final view at revision {through} differs from the database's nodes",
                    {"database_only": diff_db},
                    {"watcher_only": diff_w},
                )
            return
    v.notes.append(f"{name}: final view at {through} not compared (no consistent database snapshot at that revision)")


# -- locks ---------------------------------------------------------------------------------------


def check_locks(run: Run) -> Verdict:
    v = Verdict("locks")
    lock_name = run.params["lock_name"]
    sections = run.final.get("sections", [])
    # 1. The resource's write log: tokens never go down.
    for a, b in zip(sections, sections[1:], strict=False):
        if b["token"] < a["token"]:
            v.fail(f"the fenced resource accepted token {b['token']} after token {a['token']}", a, b)
    # 2. Accepted critical sections (enter and exit both accepted) never overlap; a token has one holder.
    spans: dict[tuple[int, str], dict[str, float]] = defaultdict(dict)
    workers: dict[int, set[str]] = defaultdict(set)
    for s in sections:
        spans[(s["token"], s["worker"])][s["phase"]] = s["at"]
        workers[s["token"]].add(s["worker"])
    for token, ws in workers.items():
        if len(ws) > 1:
            v.fail(f"token {token} wrote the resource from {len(ws)} holders: {sorted(ws)}")
    complete = sorted((p["enter"], p["exit"], t, w) for (t, w), p in spans.items() if "enter" in p and "exit" in p)
    for (s1, e1, t1, w1), (s2, e2, t2, w2) in zip(complete, complete[1:], strict=False):
        if e1 > s2:
            v.fail(
                "two accepted critical sections overlap on the resource",
                {"token": t1, "worker": w1, "enter": s1, "exit": e1},
                {"token": t2, "worker": w2, "enter": s2, "exit": e2},
            )
    # 3. What the holders believed: intervals between a grant and its last successful ensure_held(),
    # on the machine's one monotonic clock, never overlap between two grants.
    records = [dict(r, client=n) for n, recs in run.role("lock").items() for r in recs if r.get("op") == "lock"]
    granted = [r for r in records if r.get("token") is not None]
    by_token: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in granted:
        by_token[r["token"]].append(r)
    for token, rs in by_token.items():
        if len({r["lease_id"] for r in rs}) > 1:
            v.fail(f"token {token} was granted twice", *rs[:2])
    held = sorted((r for r in granted if r.get("held")), key=lambda r: r["held"][0])
    latest: dict[str, Any] | None = None
    for r in held:
        if latest is not None and r["held"][0] < latest["held"][1] and r["token"] != latest["token"]:
            v.fail(
                f"two holders believed they held {lock_name} at once (held {latest['held'][1] - r['held'][0]:.3f}s "
                "together, by the shared monotonic clock)",
                latest,
                r,
            )
        if latest is None or r["held"][1] > latest["held"][1]:
            latest = r
    for r in granted:
        if r.get("ran_past_deadline"):
            v.fail(
                f"a lock body ran {r['ran_past_deadline']:.3f}s past its lease's local deadline (it should have "
                "been cancelled first)",
                r,
            )
    # 4. Every acknowledged release happened: the log has its RELEASED event; no hold is left.
    released_events: dict[int, list[dict[str, Any]]] = defaultdict(list)
    granted_events: dict[int, dict[str, Any]] = {}
    grants: list[tuple[int, int, int]] = []
    for ev in run.final.get("events", []):
        kind = short(ev["kind"])
        if kind in ("LockReleased", "LockGranted"):
            msg = decode(ev["kind"], ev["payload"])
            if msg is None or msg.lease.name != lock_name:
                continue
            if kind == "LockReleased":
                released_events[msg.lease.lease_id].append(
                    {
                        "rev": ev["revision"],
                        "event": "LockReleased",
                        "reason": msg.reason,
                        "token": msg.lease.token,
                        "lease_id": msg.lease.lease_id,
                        "expire_time": _ts(msg.lease.expire_time),
                    }
                )
            else:
                grants.append((ev["revision"], msg.lease.token, msg.lease.lease_id))
                granted_events[msg.lease.lease_id] = {
                    "rev": ev["revision"],
                    "event": "LockGranted",
                    "token": msg.lease.token,
                    "lease_id": msg.lease.lease_id,
                    "holder": msg.lease.holder,
                    "waiter_id": msg.waiter_id,
                    "grant_time": _ts(msg.lease.grant_time),
                    "expire_time": _ts(msg.lease.expire_time),
                }
    holds = {h["lease_id"] for h in run.final.get("holds", [])}
    releases = [dict(r, client=n) for n, recs in run.role("lock").items() for r in recs if r.get("op") == "release"]
    acked = [r for r in releases if r.get("released") is True]
    for r in acked:
        evs = released_events.get(r["lease_id"], [])
        if not any(e["reason"] == "RELEASED" for e in evs):
            v.fail("an acknowledged release has no RELEASED event in the log", r, *evs)
        if r["lease_id"] in holds:
            v.fail("an acknowledged release left its hold in place", r)
    # 5. The log's own account: grants in revision order carry increasing tokens, one holder at a time.
    holder: dict[str, Any] | None = None
    ends = {lid: min(e["rev"] for e in evs) for lid, evs in released_events.items()}
    # Across a failover tokens jump (strictly increasing still): a grant numbered in an epoch carries
    # a token above that epoch's floor, above every token of an earlier epoch, lost or not.
    floors = [lo for lo, _ in _epochs(run.final, run.final.get("head_revision") or 0)]
    prev_token = 0
    for rev, token, lid in sorted(grants):
        if token <= prev_token:
            v.fail(f"LockGranted at revision {rev} carries token {token}, not above the previous grant's {prev_token}")
        floor = floors[max(0, _epoch_of(floors, rev))]
        if token <= floor:
            v.fail(f"LockGranted at revision {rev} carries token {token}, not above its epoch's floor {floor}")
        prev_token = max(prev_token, token)
        if holder is not None and ends.get(holder["lease_id"], 1 << 62) > rev:
            v.fail(
                f"the log grants {lock_name} at revision {rev} (token {token}) while token {holder['token']} "
                f"still holds it (released at revision {ends.get(holder['lease_id'])})",
                granted_events.get(holder["lease_id"]),
                granted_events.get(lid),
                *released_events.get(holder["lease_id"], []),
            )
        holder = {"lease_id": lid, "token": token}
    ok = [r for r in records if r.get("ok")]
    refused = sum(1 for s in sections if s["phase"] == "exit") - len(complete)
    v.summary = (
        f"{len(records)} attempts, {len(granted)} grants, {len(ok)} clean sections, {len(complete)} "
        f"accepted on the resource, {len(acked)} acknowledged releases, {len(grants)} grants in the log"
    )
    errors = Counter(r.get("error") for r in records if not r.get("ok"))
    if errors:
        v.notes.append("failed attempts: " + ", ".join(f"{k} {n}" for k, n in errors.most_common()))
    _ = refused
    if len(granted) < 5:
        v.fail(f"too little progress to judge: {len(granted)} grants")
    return v


# -- jobs ----------------------------------------------------------------------------------------


def check_jobs(run: Run) -> Verdict:
    v = Verdict("jobs")
    job = run.params["job"]
    ttl = run.params["job_ttl"]
    every = run.params["job_every"]
    wall0, mono0 = run.params["clock"]["wall"], run.params["clock"]["mono"]
    execs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    completes: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    claims: dict[str, list[dict[str, Any]]] = defaultdict(list)
    starts: list[float] = []
    for name, recs in run.role("jobs").items():
        for r in recs:
            r = dict(r, client=name)
            if r.get("op") == "exec" and r.get("phase") == "start":
                execs[r["slot"]].append(r)
            elif r.get("op") == "complete":
                completes[(r["slot"], r["token"])].append(r)
            elif r.get("op") == "claim":
                claims[r["slot"]].append(r)
            elif r.get("op") == "start":
                starts.append(r["t"])
    firings = {f["slot"]: f for f in run.final.get("firings", []) if f["job"] == job}
    for slot, es in execs.items():
        tokens = Counter(e["token"] for e in es)
        for token, n in tokens.items():
            if n > 1:
                v.fail(f"firing {slot} ran {n} times under token {token}", *[e for e in es if e["token"] == token][:2])
        if len(es) > 1:
            es = sorted(es, key=lambda e: e["token"])
            for e in es[:-1]:
                done = [c for c in completes.get((slot, e["token"]), []) if c.get("state") == "COMPLETED"]
                if done:
                    v.fail(
                        f"firing {slot} ran again (token {es[-1]['token']}) after token {e['token']} completed it",
                        e,
                        done[0],
                        es[-1],
                    )
            lo, hi = es[0]["t"] - 1.0, es[-1]["t"] + 1.0
            if not _faults_overlapping(run, lo - ttl, hi):
                v.fail(f"firing {slot} ran {len(es)} times with no fault in effect", *es[:2])
        f = firings.get(_pg_slot(slot, firings))
        if f is not None and max(tokens) > f["token"]:
            v.fail(f"firing {slot} ran under token {max(tokens)}, above the database's {f['token']}", es[-1], f)
    # Exactly once: every slot between the schedulers' start and the end ran. A slot may be lost only if
    # no scheduler could have claimed it within its misfire threshold: every scheduler frozen at its time,
    # or the database down for the whole threshold. A claim failing on a dead or cut replica is no excuse:
    # another replica was up, and the threshold leaves time to claim late.
    ran = {_epoch(s) for s in execs}
    if not starts:
        v.fail("no scheduler history")
        return v
    misfire = float(run.params.get("job_misfire", 10.0))
    schedulers = sorted(run.role("jobs"))
    first = _wall(max(starts), wall0, mono0) + 2.0
    last = _wall(run.params["until"], wall0, mono0) - max(ttl, 3.0) - 1.0
    slot = (int(first // every) + 1) * every
    expected = 0
    excused: list[tuple[float, str]] = []
    missed: list[float] = []
    while slot <= last:
        expected += 1
        if not any(abs(slot - r) < 1e-3 for r in ran):
            excuse = _job_excuse(run, _mono(slot, wall0, mono0), misfire, schedulers)
            if excuse:
                excused.append((slot, excuse))
            else:
                missed.append(slot)
        slot += every
    for group in _runs(missed, every):
        at = _mono(group[0], wall0, mono0)
        cs = [c for g in claims.values() for c in g if group[0] - 1e-3 <= _epoch(c["slot"]) <= group[-1] + 1e-3]
        errors = Counter(c.get("error") or "claimed" for c in cs)
        faults = _faults_overlapping(run, at - 1.0, _mono(group[-1], wall0, mono0) + 1.0)
        v.fail(
            f"{len(group)} slot(s) of {job} from {_iso(group[0])} to {_iso(group[-1])} never ran: their claims "
            f"ended {dict(errors)} and no scheduler claimed them again, though the misfire threshold "
            f"({misfire:g}s) allowed a late run (faults then: "
            f"{', '.join(f['kind'] + ' ' + f['target'] for f in faults) or 'none'})",
            *cs[:2],
            {
                "in the database": [
                    firings.get(_pg_slot(_iso_full(x), firings)) or "no row (never claimed)" for x in group[:3]
                ]
            },
            *faults[:2],
        )
    n_exec = sum(len(es) for es in execs.values())
    v.summary = (
        f"{len(execs)} firings ran ({n_exec} executions); {expected} slots expected, "
        f"{len(excused)} missed while no scheduler could claim them, {len(missed)} lost"
    )
    reruns = sum(1 for es in execs.values() if len(es) > 1)
    if reruns:
        v.notes.append(f"{reruns} firings ran again after their claimer stalled (allowed: a new token each)")
    return v


def _job_excuse(run: Run, at: float, misfire: float, schedulers: list[str]) -> str:
    paused = {f["target"] for f in run.faults if f["kind"] == "pause_scheduler" and f["start"] <= at <= f["end"]}
    if paused >= set(schedulers):
        return "every scheduler was frozen"
    if any(f["kind"] == "pg_restart" and f["start"] <= at and f["end"] >= at + misfire for f in run.faults):
        return "the database was down for the whole misfire threshold"
    # A failover: no primary from the kill until the promotion (the rebuild after it is no excuse).
    if any(f["kind"] == "failover" and f["start"] <= at and f.get("promoted", 0) >= at + misfire for f in run.faults):
        return "no primary for the whole misfire threshold (a failover)"
    return ""


def _runs(slots: list[float], every: float) -> list[list[float]]:
    out: list[list[float]] = []
    for s in slots:
        if out and abs(s - out[-1][-1] - every) < 1e-3:
            out[-1].append(s)
        else:
            out.append([s])
    return out


def _iso(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S")


def _iso_full(epoch: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


def _pg_slot(iso: str, firings: dict[str, Any]) -> str:
    t = _epoch(iso)
    for k, f in firings.items():
        if abs(f["at"] - t) < 1e-3:
            return k
    return ""


def _wall(mono: float, wall0: float, mono0: float) -> float:
    return mono - mono0 + wall0


def _mono(wall: float, wall0: float, mono0: float) -> float:
    return wall - wall0 + mono0


# -- balancer ------------------------------------------------------------------------------------


def check_balancer(run: Run) -> Verdict:
    v = Verdict("balancer")
    replay = Replay.of([dict(e) for e in run.final.get("events", [])])
    # When each revision was first published: the earliest time an unfiltered watcher received it.
    published: dict[int, float] = {}
    for name, recs in run.role("watch").items():
        if run.client(name).get("kinds"):
            continue
        for r in recs:
            if r.get("op") == "event":
                published[r["rev"]] = min(published.get(r["rev"], r["t"]), r["t"])
    pub_revs = sorted(published)
    pub_times = [published[r] for r in pub_revs]
    # Known at time t: the highest revision published by then (streams are gap-free, checked above).
    running_max: list[int] = []
    order = sorted(zip(pub_times, pub_revs, strict=True))
    m = 0
    for _, r in order:
        m = max(m, r)
        running_max.append(m)
    times_sorted = [t for t, _ in order]

    def known_at(t: float) -> int:
        i = bisect.bisect_left(times_sorted, t) - 1
        return running_max[i] if i >= 0 else 0

    drains = _admin_acks(run)
    placements = [dict(r, client=n) for n, recs in run.role("place").items() for r in recs if r.get("op") == "place"]
    ok = [p for p in placements if p.get("ok")]
    in_flight: list[tuple[dict[str, Any], int, tuple[str, str, str]]] = []
    for p in ok:
        node, rev = p["node"], p.get("rev") or 0
        known = known_at(p["t0"])
        state = replay.node_at(node, known)
        why = None
        if not eligible(state) and state is not None and known < rev:
            restored = [c for c in replay.changes_between(node, known, rev) if eligible(c[1])]
            if not restored:
                bad = next((c for c in reversed(replay.node_changes.get(node, [])) if c[0] <= known), None)
                ev = replay.by_rev.get(bad[0]) if bad else None
                lag = p["t0"] - published.get(bad[0], p["t0"]) if bad else 0.0
                why = (
                    f"session placed on node {node} at revision {rev}, though the log had published {state} "
                    f"for it at revision {bad[0] if bad else '?'} ({lag:.3f}s before the request was sent)"
                )
                v.fail(why, p, _event_brief(ev), _event_brief(replay.by_rev.get(rev)))
        # Operator acknowledgements: a drain acknowledged before the request was sent.
        for d in drains:
            if d["node"] == node and d["op"] == "drain" and d["t1"] < p["t0"] and why is None:
                undrained = any(u["node"] == node and u["op"] == "undrain" and u["t0"] < p["t1"] for u in drains)
                if not undrained:
                    v.fail(
                        f"session placed on node {node} after its drain was acknowledged "
                        f"({p['t0'] - d['t1']:.3f}s before the request)",
                        d,
                        p,
                    )
        at_rev = replay.node_at(node, rev - 1)
        if why is None and at_rev is not None and not eligible(at_rev):
            bad = next((c for c in reversed(replay.node_changes.get(node, [])) if c[0] < rev), None)
            in_flight.append((p, bad[0] if bad else 0, at_rev))
    if in_flight:
        examples = "; ".join(
            f"{p['sid']} on node {p['node']} at revision {p['rev']} ({st[0]}/{st[1]}/{st[2]} since revision {r}, "
            f"request sent {p['t1'] - p['t0']:.2f}s before its answer)"
            for p, r, st in in_flight[:3]
        )
        v.notes.append(
            f"{len(in_flight)} placements went to a node that was already ineligible at the placement's own "
            "revision, but only became so after the request was sent (the request was in flight; not counted "
            f"as a violation): {examples}"
        )
    # Failover: every session of a node that died moved exactly once (or ended first).
    moved_from: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for mv in replay.moves:
        moved_from[mv["prev"]].append(mv)
    for prev, mvs in moved_from.items():
        if len(mvs) > 1:
            v.fail(f"session {prev} moved {len(mvs)} times", *mvs[:3])
    death_of: dict[str, list[int]] = defaultdict(list)
    n_dead_sessions = excused = 0
    for rev, node, sessions, ev in replay.deaths:
        # Sessions can only move while another node can take them: the balancer moves them on the
        # node's death event and then in a sweep every 2 s. A node back ONLINE before any other was
        # eligible for that long keeps its sessions.
        back, room = replay.eligible_elsewhere(node, rev)
        must_move = room >= SWEEP_SLACK
        for sid in sessions:
            n_dead_sessions += 1
            death_of[sid].append(rev)
            mvs = [mv for mv in moved_from.get(sid, []) if mv["rev"] > rev]
            ended = replay.ended.get(sid)
            if not mvs and not (ended and ended > rev):
                if not must_move:
                    excused += 1
                    continue
                v.fail(
                    f"session {sid} of node {node} was never moved after the node died at revision {rev}, "
                    f"though another node could take it for {room:.1f}s before "
                    + (f"the node came back at revision {back}" if back else "the end"),
                    _event_brief(ev),
                    _event_brief(replay.by_rev.get(back)) if back else "(never came back)",
                )
    if excused:
        v.notes.append(
            f"{excused} sessions stayed on a dead node that came back before any other node could take them "
            f"for {SWEEP_SLACK:g}s (no eligible node)"
        )
    for mv in replay.moves:
        # A move must follow a death of the node the session was on (or the session arrived on a dead node).
        if not any(d < mv["rev"] for d in death_of.get(mv["prev"], [])):
            deaths_of_node = [d for d, n, _, _ in replay.deaths if n == mv["pnode"] and d < mv["rev"]]
            since = mv.get("since") or 0
            arrived_dead = (
                replay.node_at(mv["pnode"], since) is None or replay.node_at(mv["pnode"], since)[0] != "ONLINE"
            )
            if not arrived_dead and not any(d > since for d in deaths_of_node):
                v.fail(f"session {mv['prev']} moved off node {mv['pnode']}, which had not died since it got there", mv)
    # A moved session's old id leads to its new node for good: nothing brings the old id back.
    reported: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in replay.events:
        if e.get("short") in ("SessionPlaced", "SessionStarted"):
            reported[e["sid"]].append(e)
    for mv in replay.moves:
        again = [e for e in reported.get(mv["prev"], []) if e["revision"] > mv["rev"]]
        if again:
            e = again[0]
            v.fail(
                f"session {mv['prev']} was moved to {mv['sid']} on node {mv['snode']} (revision {mv['rev']}), then "
                f"{e['short']} at revision {e['revision']} re-created it under its old id on node {e.get('snode')}: "
                f"RouteSession({mv['prev']}) no longer leads to the new node and the session exists twice",
                mv,
                _event_brief(e),
            )
    moved_ids = {m["old_id"]: m["new_id"] for m in run.final.get("moves", [])}
    live_ids = {x["id"]: x for x in run.final.get("sessions", [])}
    for old, new in moved_ids.items():
        if old in live_ids and not any(mv["prev"] == old for mv in replay.moves):
            v.fail(f"session {old} exists although it was moved to {new}", live_ids[old])
        # A move goes to a node the balancer's view shows ONLINE; the view follows the stream, so a node
        # that left moments before may still be chosen. Counted once its leaving was published a
        # second before the move was.
        target = replay.node_at(mv["snode"], mv["rev"] - 1)
        if target is not None and target[0] != "ONLINE":
            left = next((r for r, st in reversed(replay.node_changes.get(mv["snode"], [])) if r < mv["rev"]), 0)
            lag = published.get(mv["rev"], 0.0) - published.get(left, float("inf"))
            if lag > MOVE_LAG:
                v.fail(
                    f"session {mv['prev']} moved onto node {mv['snode']}, which had been {target[0]} since revision "
                    f"{left}, published {lag:.2f}s before the move",
                    mv,
                    _event_brief(replay.by_rev.get(left)),
                )
            else:
                v.notes.append(f"session {mv['prev']} moved onto node {mv['snode']} {lag:.2f}s after it left (a race)")
    # At the end no session is left on a node that is not ONLINE.
    online = {n["id"] for n in run.final.get("nodes", []) if n["state"] == 2}
    stranded = [s for s in run.final.get("sessions", []) if s["node_id"] not in online]
    if stranded:
        v.fail(f"{len(stranded)} sessions are left on nodes that are not ONLINE at the end", *stranded[:3])
    v.summary = (
        f"{len(ok)}/{len(placements)} placements, {len(replay.deaths)} node deaths with "
        f"{n_dead_sessions} sessions, {len(replay.moves)} moves, {len(drains)} drain operations"
    )
    errors = Counter(p.get("reason") or p.get("error") for p in placements if not p.get("ok"))
    if errors:
        v.notes.append("failed placements: " + ", ".join(f"{k} {n}" for k, n in errors.most_common()))
    if not any(d["op"] == "drain" for d in drains):
        v.fail("the node was never drained (the admin's drain did not succeed)")
    return v


def _admin_acks(run: Run) -> list[dict[str, Any]]:
    return [
        r for recs in run.role("admin").values() for r in recs if r.get("op") in ("drain", "undrain") and r.get("ok")
    ]


def _event_brief(ev: dict[str, Any] | None) -> Any:
    if ev is None:
        return None
    out = {"rev": ev["revision"], "kind": short(ev["kind"]), "node": ev["node_id"], "time": ev.get("time")}
    for k in ("node_state", "mode", "sid", "snode", "prev"):
        if k in ev:
            out[k] = ev[k]
    return out


# -- keys ----------------------------------------------------------------------------------------


def check_keys(run: Run) -> Verdict:
    from muster.client import keyfiles

    v = Verdict("keys")
    versions = run.final.get("key_versions", [])
    active = [k for k in versions if k["state"] == 2]
    pending = [k for k in versions if k["state"] == 1]
    if len(active) != 1:
        v.fail(f"{len(active)} ACTIVE key versions at the end", *versions)
        return v
    act = active[0]
    if pending:
        v.fail(f"key version {pending[0]['version']} is still PENDING at the end (never promoted)", *pending)
    rotations = [r for recs in run.role("admin").values() for r in recs if r.get("op") == "rotate" and r.get("ok")]
    if not rotations:
        v.fail("the keys were never rotated (the admin's rotation did not succeed)")
    elif act["version"] < max(r["version"] for r in rotations):
        v.fail(
            f"the rotation to version {max(r['version'] for r in rotations)} never became ACTIVE "
            f"(ACTIVE is {act['version']})",
            *rotations,
        )
    # An agent down through a whole rotation holds a retired version and is refused at its next join
    # (by design: a retired key is no longer trusted); the operator's fix is to remove its key files.
    states = {k["version"]: k["state"] for k in versions}
    for r in run.params.get("agent_refusals", []):
        m = re.search(r"holds retired version (\d+)", r.get("tail", ""))
        held = int(m.group(1)) if m else None
        if held is None or states.get(held) != 4:
            v.fail(f"agent {r['agent']} was refused for a version that is not RETIRED ({held})", r["tail"][-600:])
        else:
            v.notes.append(
                f"agent {r['agent']} was down through the rotation, refused for retired version {held}, "
                "and fetched the ACTIVE version once its files were removed"
            )
    agents = run.params["agents"]
    for a in agents:
        local = keyfiles.check(keyfiles.KeyPaths.in_dir(Path(a["keys_dir"])))
        got = (local.cookie_fingerprint, local.launcher_fingerprint)
        want = (act["cookie_fingerprint"], act["launcher_fingerprint"])
        if got != want:
            v.fail(
                f"agent {a['name']} ends with key files of another version than the ACTIVE {act['version']}",
                {"agent": a["name"], "files": got, "active": want, "problems": [p.message for p in local.problems]},
            )
    # No key bytes in any log.
    secrets = _secrets(run)
    logs = sorted((run.workdir / "logs").glob("*.log"))
    hits = 0
    for path in logs:
        data = path.read_bytes()
        for label, needle in secrets:
            at = data.find(needle)
            if at >= 0:
                hits += 1
                line_start = data.rfind(b"\n", 0, at) + 1
                v.fail(
                    f"{label} appears in {path.name} at byte {at}",
                    data[line_start:at].decode(errors="replace")[-160:] + "«KEY»",
                )
    v.summary = (
        f"ACTIVE version {act['version']} ({act['cookie_fingerprint']}), {len(agents)} agents checked, "
        f"{len(secrets)} key encodings searched in {len(logs)} logs"
    )
    return v


def _secrets(run: Run) -> list[tuple[str, bytes]]:
    """Every key seen during the run, in the encodings a log could carry it."""
    out: list[tuple[str, bytes]] = []
    seen_dir = run.workdir / "keys_seen"
    master = base64.b64decode(run.params["master_key"])
    raw_keys = [("master key", master)]
    for d in sorted(seen_dir.glob("*")):
        cookie = d / "secure-cookie-key"
        if cookie.exists():
            raw_keys.append((f"cookie key {d.name}", cookie.read_bytes()))
        pem = d / "launcher.pem"
        if pem.exists():
            body = [ln for ln in pem.read_text().splitlines() if ln and not ln.startswith("-----")]
            # Two lines from the middle of the private key's PEM body: no public part shares them.
            for i in (len(body) // 2, len(body) // 2 + 1):
                if 0 <= i < len(body):
                    out.append((f"launcher private key {d.name} (PEM line {i})", body[i].encode()))
    for label, key in raw_keys:
        out.append((f"{label} (raw)", key))
        out.append((f"{label} (hex)", key.hex().encode()))
        out.append((f"{label} (HEX)", key.hex().upper().encode()))
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(key)
            out.append((f"{label} (base64)", text))
            out.append((f"{label} (base64, unpadded)", text.rstrip(b"=")))
        out.append((f"{label} (repr)", repr(key).encode()[2:-1]))
    return out


# -- clock skew ----------------------------------------------------------------------------------


def check_skew(run: Run) -> Verdict:
    v = Verdict("clock skew")
    skew = run.params.get("skew") or {}
    if skew.get("skipped"):
        if os.environ.get("MUSTER_REQUIRE_FAKETIME") == "1" or run.params.get("require_faketime"):
            v.fail("faketime is not installed and MUSTER_REQUIRE_FAKETIME=1: the skewed-clock fault could not run")
        else:
            v.notes.append("faketime is not installed: the skewed-clock fault was skipped")
        v.summary = "skipped"
        return v
    wall0, mono0 = run.params["clock"]["wall"], run.params["clock"]["mono"]
    for name in skew.get("clients", []):
        start = next((r for r in run.clients.get(name, []) if r.get("op") == "start"), None)
        if start is None:
            v.fail(f"{name}: no start record")
            continue
        shift = (start["wall"] - start["t"]) - (wall0 - mono0)
        if abs(shift - skew["seconds"]) > 120:
            v.fail(
                f"{name}: its wall clock is off by {shift:.0f}s, not the {skew['seconds']:.0f}s asked of faketime",
                start,
            )
        else:
            v.notes.append(f"{name} ran with its wall clock {shift / 3600:+.1f}h off")
    v.summary = f"{skew.get('offset')} on {', '.join(skew.get('clients', []))}"
    return v


# -- processes -----------------------------------------------------------------------------------


def check_processes(run: Run) -> Verdict:
    """The agents ride through every fault (README: through a replica or database restart, rejoining
    after an expired lease) and every workload client ends cleanly, so every history is whole."""
    v = Verdict("processes")
    for e in run.params.get("agent_exits", []):
        v.fail(f"agent {e['agent']} exited by itself (code {e['code']})", e.get("tail", "")[-600:])
    codes = run.params.get("exit_codes", {})
    for c in run.params["clients"]:
        code = codes.get(c["name"], "missing")
        if code != 0:
            log = run.workdir / "logs" / f"{c['name']}.log"
            tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
            v.fail(f"client {c['name']} ended with {'a kill (it did not finish)' if code is None else code}", tail)
    # A server answers every request with a defined status: an unexpected exception in a handler
    # (logged "unexpected error in <method>", answered INTERNAL) is a bug whatever the fault.
    for path in sorted((run.workdir / "logs").glob("replica-*.log")):
        text = path.read_text(errors="replace")
        at = text.find("unexpected error in ")
        if at >= 0:
            v.fail(f"{path.stem} answered INTERNAL for an unexpected exception", text[at : at + 1500])
    internal = [r for recs in run.clients.values() for r in recs if r.get("error") == "InternalError"]
    for r in internal[:5]:
        v.notes.append(f"a client got INTERNAL (from the transport, not a server handler): {r}")
    # Every replica answers its health check after the faults (a stuck event loop answers nothing,
    # and its clients time out on it without end).
    for name, status in sorted(run.params.get("replica_health", {}).items()):
        if status != "SERVING":
            stacks = run.workdir / "logs" / f"{name}.stacks"
            v.fail(
                f"{name} is {status} after the faults were healed and the cluster settled",
                stacks.read_text()[:1500] if stacks.exists() else "(no stacks: py-spy is not installed)",
            )
    settle = run.params.get("settle", {})
    if settle.get("pending"):
        v.fail(f"the cluster did not settle within the bound after the faults: {settle['pending']}")
    v.summary = f"{len(run.params.get('agents', []))} agents, {len(run.params['clients'])} clients"
    return v


CHECKERS: list[Callable[[Run], Verdict]] = [
    check_stream,
    check_locks,
    check_jobs,
    check_balancer,
    check_keys,
    check_skew,
    check_processes,
]


def run_all(run: Run) -> list[Verdict]:
    out = []
    for checker in CHECKERS:
        try:
            out.append(checker(run))
        except Exception as exc:  # noqa: BLE001 - a checker that breaks is a failed check, not a crash
            import traceback

            v = Verdict(checker.__name__.removeprefix("check_"))
            v.fail(f"the checker itself failed: {type(exc).__name__}: {exc}", traceback.format_exc()[-1500:])
            out.append(v)
    return out
