"""The job's ledger: one SQLite file in the output folder.

``subjects`` holds each subject's state (pending, running, done, failed), its attempts, the server
and prompt id of its current attempt, and, once done, its outputs with their hashes. ``events``
is the log: every claim, completion, failure, requeue and lost server, with the run that wrote
it. ``servers`` remembers the servers a run started, so the next run can take them over.

Only the job's driver writes. Each state change is one transaction; a subject becomes ``done``
only from ``running`` with the same prompt id, in the transaction that logs its one ``done``
event, so a subject can finish once only, whatever was killed when.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS subjects(
    name TEXT PRIMARY KEY, position INTEGER, fingerprint TEXT, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, server TEXT, prompt_id TEXT, client_id TEXT,
    started_at REAL, finished_at REAL, seconds REAL, error TEXT, result TEXT, stale INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT, t REAL, run INTEGER, subject TEXT, server TEXT,
    kind TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS runs(
    id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL, ended REAL, pid INTEGER, status TEXT);
CREATE TABLE IF NOT EXISTS servers(
    label TEXT PRIMARY KEY, url TEXT, pid INTEGER, node_id TEXT, state TEXT, updated REAL);
"""
STATES = ("pending", "running", "done", "failed")


class Ledger:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.run_id = 0

    def close(self):
        self.db.close()

    # -- transactions --------------------------------------------------------------------------------
    def _tx(self, fn):
        self.db.execute("BEGIN IMMEDIATE")
        try:
            out = fn(self.db)
            self.db.execute("COMMIT")
            return out
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _event(self, db, subject, kind, detail="", server=""):
        db.execute("INSERT INTO events(t, run, subject, server, kind, detail) VALUES (?,?,?,?,?,?)",
                   (time.time(), self.run_id, subject, server, kind, detail))

    def event(self, subject, kind, detail="", server=""):
        self._tx(lambda db: self._event(db, subject, kind, detail, server))

    # -- runs ----------------------------------------------------------------------------------------
    def begin_run(self, pid: int) -> int:
        def go(db):   # a run still 'running' here was killed (one run at a time: the job's lock)
            db.execute("UPDATE runs SET status='killed' WHERE status='running'")
            cur = db.execute("INSERT INTO runs(started, pid, status) VALUES (?,?, 'running')", (time.time(), pid))
            return cur.lastrowid
        self.run_id = self._tx(go)
        return self.run_id

    def end_run(self, status: str):
        self._tx(lambda db: db.execute("UPDATE runs SET ended=?, status=? WHERE id=?", (time.time(), status, self.run_id)))

    def runs(self) -> list:
        return [dict(r) for r in self.db.execute("SELECT * FROM runs ORDER BY id")]

    # -- subjects ------------------------------------------------------------------------------------
    def sync(self, subjects: list, retry_failed: bool = False, redo_changed: bool = False) -> dict:
        """Register the catalogue's subjects ``[(name, fingerprint, problems)]``: new ones are
        pending (failed at once with their problems); a failed one whose inputs changed (or all
        failed ones with ``retry_failed``) is pending again; a done one whose inputs changed is
        marked stale and redone only with ``redo_changed``. Returns counts of what changed."""
        changes = {"new": 0, "retried": 0, "stale": 0, "redone": 0}

        def go(db):
            for pos, (name, fp, problems) in enumerate(subjects):
                row = db.execute("SELECT state, fingerprint FROM subjects WHERE name=?", (name,)).fetchone()
                if row is None:
                    db.execute("INSERT INTO subjects(name, position, fingerprint, state) VALUES (?,?,?, 'pending')",
                               (name, pos, fp))
                    self._event(db, name, "queued")
                    changes["new"] += 1
                    row = {"state": "pending", "fingerprint": fp}
                else:
                    db.execute("UPDATE subjects SET position=? WHERE name=?", (pos, name))
                changed = row["fingerprint"] != fp
                if problems:
                    if row["state"] != "failed" or changed:
                        db.execute("UPDATE subjects SET state='failed', fingerprint=?, error=?, finished_at=?, "
                                   "stale=0 WHERE name=?", (fp, "\n".join(problems), time.time(), name))
                        self._event(db, name, "failed", "\n".join(problems))
                    continue
                if row["state"] == "failed" and (changed or retry_failed):
                    db.execute("UPDATE subjects SET state='pending', fingerprint=?, error=NULL, attempts=0, "
                               "stale=0 WHERE name=?", (fp, name))
                    self._event(db, name, "queued", "inputs changed" if changed else "retry requested")
                    changes["retried"] += 1
                elif row["state"] == "done" and changed:
                    if redo_changed:
                        db.execute("UPDATE subjects SET state='pending', fingerprint=?, attempts=0, stale=0 "
                                   "WHERE name=?", (fp, name))
                        self._event(db, name, "queued", "inputs changed: redone")
                        changes["redone"] += 1
                    else:
                        db.execute("UPDATE subjects SET stale=1 WHERE name=?", (name,))
                        changes["stale"] += 1
                elif row["state"] in ("pending", "running") and changed:
                    db.execute("UPDATE subjects SET fingerprint=?, state='pending', prompt_id=NULL WHERE name=?",
                               (fp, name))
            known = {n for n, _, _ in subjects}
            for r in db.execute("SELECT name FROM subjects").fetchall():
                if r["name"] not in known:
                    db.execute("UPDATE subjects SET position=NULL WHERE name=?", (r["name"],))
        self._tx(go)
        return changes

    def claim(self, name: str, server: str, prompt_id: str, client_id: str) -> int:
        """pending -> running on ``server`` with a new prompt id; returns the attempt number."""
        def go(db):
            row = db.execute("SELECT state, attempts FROM subjects WHERE name=?", (name,)).fetchone()
            if row is None or row["state"] != "pending":
                raise RuntimeError(f"subject {name} is {row and row['state']}, not pending")
            attempt = row["attempts"] + 1
            db.execute("UPDATE subjects SET state='running', attempts=?, server=?, prompt_id=?, client_id=?, "
                       "started_at=?, error=NULL WHERE name=?", (attempt, server, prompt_id, client_id, time.time(), name))
            self._event(db, name, "started", f"attempt {attempt}, prompt {prompt_id}", server)
            return attempt
        return self._tx(go)

    def finish(self, name: str, prompt_id: str, result: dict) -> bool:
        """running (this prompt) -> done with ``result``; False if it was not running it. Its
        seconds run from the attempt's start (in an earlier run, for a rejoined prompt)."""
        def go(db):
            now = time.time()
            cur = db.execute("UPDATE subjects SET state='done', result=?, finished_at=?, seconds=?-started_at, "
                             "stale=0 WHERE name=? AND state='running' AND prompt_id=?",
                             (json.dumps(result), now, now, name, prompt_id))
            if cur.rowcount == 1:
                row = db.execute("SELECT server, seconds FROM subjects WHERE name=?", (name,)).fetchone()
                self._event(db, name, "done", f"{row['seconds']:.1f} s", row["server"])
            return cur.rowcount == 1
        return self._tx(go)

    def fail(self, name: str, error: str, prompt_id: str | None = None):
        def go(db):
            q = "UPDATE subjects SET state='failed', error=?, finished_at=? WHERE name=?"
            args = [error, time.time(), name]
            if prompt_id:
                q += " AND prompt_id=?"
                args.append(prompt_id)
            if db.execute(q, args).rowcount:
                srv = db.execute("SELECT server FROM subjects WHERE name=?", (name,)).fetchone()["server"]
                self._event(db, name, "failed", error, srv or "")
        self._tx(go)

    def requeue(self, name: str, reason: str, server: str = ""):
        def go(db):
            if db.execute("UPDATE subjects SET state='pending', prompt_id=NULL WHERE name=? AND state='running'",
                          (name,)).rowcount:
                self._event(db, name, "requeued", reason, server)
        self._tx(go)

    def subject(self, name: str) -> dict:
        return _row(self.db.execute("SELECT * FROM subjects WHERE name=?", (name,)).fetchone())

    def subjects(self, state: str | None = None, current_only: bool = True) -> list:
        q = "SELECT * FROM subjects"
        cond, args = [], []
        if state:
            cond.append("state=?")
            args.append(state)
        if current_only:
            cond.append("position IS NOT NULL")
        if cond:
            q += " WHERE " + " AND ".join(cond)
        return [_row(r) for r in self.db.execute(q + " ORDER BY position, name", args)]

    def counts(self) -> dict:
        out = {s: 0 for s in STATES}
        for r in self.db.execute("SELECT state, COUNT(*) n FROM subjects WHERE position IS NOT NULL GROUP BY state"):
            out[r["state"]] = r["n"]
        out["stale"] = self.db.execute("SELECT COUNT(*) FROM subjects WHERE stale=1 AND position IS NOT NULL").fetchone()[0]
        return out

    def events(self, subject: str | None = None) -> list:
        if subject is None:
            return [dict(r) for r in self.db.execute("SELECT * FROM events ORDER BY id")]
        return [dict(r) for r in self.db.execute("SELECT * FROM events WHERE subject=? ORDER BY id", (subject,))]

    # -- servers the job started ------------------------------------------------------------------
    def server_record(self, label: str) -> dict | None:
        r = self.db.execute("SELECT * FROM servers WHERE label=?", (label,)).fetchone()
        return dict(r) if r else None

    def set_server(self, label: str, url: str, pid: int, node_id: str, state: str):
        self._tx(lambda db: db.execute(
            "INSERT INTO servers(label, url, pid, node_id, state, updated) VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(label) DO UPDATE SET url=excluded.url, pid=excluded.pid, node_id=excluded.node_id, "
            "state=excluded.state, updated=excluded.updated", (label, url, pid, node_id, state, time.time())))


def _row(r) -> dict:
    if r is None:
        return None
    d = dict(r)
    d["result"] = json.loads(d["result"]) if d.get("result") else None
    return d
