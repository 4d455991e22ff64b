"""The node's queue on disk (SQLite, `<out>/queue.sqlite`): every study received, its instances and every send.

A study moves receiving -> predicting -> sending -> done (or failed: predict refused it, or did not end in
PREDICT_TRIES tries, the reason kept); a send is pending, then sent (or refused: the destination cannot take that
kind of object, or the file is gone: not tried again, the reason kept). Each
step is one transaction, committed before the next begins, so a node killed at any moment (kill -9 included)
restarts where it was: a study caught predicting is predicted again into the same folder (predict resumes, and the
results' UIDs follow from the prediction, so they are the same objects), a send not marked sent is sent again (a
PACS keeps one copy of a SOP Instance UID it already holds). A send that fails waits `backoff` seconds, doubled
at each failure (at most an hour), and is never dropped.

SQLite because it is in Python's standard library and survives a kill in the middle of a write (its journal);
one connection, used under a lock by the SCP's association threads and the worker.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

QUEUE_FILE = "queue.sqlite"
STATES = ("receiving", "predicting", "sending", "done", "failed")
MAX_WAIT = 3600.0  # seconds: the longest wait between two tries of a send
PREDICT_TRIES = 3  # a study whose predict was cut (a kill, a crash) this many times is failed, not tried forever

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    uid TEXT PRIMARY KEY, state TEXT NOT NULL, received REAL NOT NULL, last_instance REAL NOT NULL,
    instances INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, predicted REAL, finished REAL, error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, file TEXT NOT NULL, bytes INTEGER NOT NULL, received REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sends (
    study_uid TEXT NOT NULL, destination TEXT NOT NULL, sop_uid TEXT NOT NULL, file TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending', attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0,
    sent REAL, error TEXT, PRIMARY KEY (destination, sop_uid)
);
CREATE TABLE IF NOT EXISTS seen (uid TEXT PRIMARY KEY, instances INTEGER NOT NULL, changed REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Queue:
    """The queue of `<folder>/queue.sqlite` (created when missing)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / QUEUE_FILE
        self.lock = threading.Lock()
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before the sender is answered
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextmanager
    def _transaction(self):
        """One write transaction under the lock: committed whole, or rolled back."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def _write(self, *statements: tuple[str, tuple]) -> None:
        with self._transaction() as db:
            for sql, args in statements:
                db.execute(sql, args)

    def _rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self.lock:
            cur = self.db.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    # studies and instances
    def study(self, uid: str) -> dict | None:
        rows = self._rows("SELECT * FROM studies WHERE uid = ?", (uid,))
        return rows[0] if rows else None

    def has_instance(self, sop_uid: str) -> bool:
        return bool(self._rows("SELECT 1 FROM instances WHERE sop_uid = ?", (sop_uid,)))

    def stored_bytes(self) -> int:
        return int(self._rows("SELECT COALESCE(SUM(bytes), 0) AS n FROM instances")[0]["n"])

    def add_instance(self, study_uid: str, sop_uid: str, file: str, size: int, now: float | None = None) -> None:
        """Record an instance written to `file` (relative to the node's folder); its study starts receiving or goes on."""
        now = time.time() if now is None else now
        self._write(
            ("INSERT INTO studies (uid, state, received, last_instance) VALUES (?, 'receiving', ?, ?) ON CONFLICT(uid) "
             "DO UPDATE SET last_instance = excluded.last_instance", (study_uid, now, now)),
            ("INSERT INTO instances VALUES (?, ?, ?, ?, ?)", (sop_uid, study_uid, file, size, now)),
            ("UPDATE studies SET instances = instances + 1, bytes = bytes + ? WHERE uid = ?", (size, study_uid)),
        )  # fmt: skip

    def complete(self, quiet: float, now: float | None = None, fetched_only: bool = False) -> list[dict]:
        """Studies to predict: caught predicting by a kill, then those receiving with no instance for `quiet` seconds
        (fetched_only: those a poll fetched whole, marked by fetched())."""
        now = time.time() if now is None else now
        return self._rows(
            "SELECT * FROM studies WHERE state = 'predicting' OR (state = 'receiving' AND last_instance <= ?) "
            "ORDER BY state = 'receiving', last_instance",
            (0 if fetched_only else now - quiet,),
        )

    def begin(self, uid: str, quiet: float, fetched_only: bool = False) -> int | None:
        """Mark a study predicting, if it still is complete (no instance came since complete() listed it), counting
        the try in the same commit; returns the tries so far, or None when it is not complete any more."""
        limit = 0 if fetched_only else time.time() - quiet
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE studies SET state = 'predicting', attempts = attempts + 1 WHERE uid = ? AND "
                "(state = 'predicting' OR (state = 'receiving' AND last_instance <= ?))",
                (uid, limit),
            )
            tries = db.execute("SELECT attempts FROM studies WHERE uid = ?", (uid,)).fetchone()
        return int(tries[0]) if cur.rowcount == 1 else None

    def fetched(self, uid: str) -> None:
        """A polled study fetched whole (or found with nothing to predict): complete now (its quiet time was counted
        on the server), and never fetched again."""
        self._write(
            ("UPDATE studies SET last_instance = 0 WHERE uid = ? AND state = 'receiving'", (uid,)),
            ("UPDATE seen SET instances = -2 WHERE uid = ?", (uid,)),
        )

    def set_state(self, uid: str, state: str, error: str | None = None) -> None:
        assert state in STATES, state
        stamp = {"sending": ", predicted = ?", "done": ", finished = ?", "failed": ", finished = ?"}.get(state, "")
        args = (state, error, *([time.time()] if stamp else []), uid)
        self._write((f"UPDATE studies SET state = ?, error = ?{stamp} WHERE uid = ?", args))

    def predicted(self, uid: str, sends: list[tuple[str, str, str]]) -> None:
        """A study's results, each (destination, sop_uid, file) to send: listed and the study sending, in one commit."""
        self._write(
            *[
                ("INSERT OR IGNORE INTO sends (study_uid, destination, sop_uid, file) VALUES (?, ?, ?, ?)", (uid, *s))
                for s in sends
            ],
            ("UPDATE studies SET state = ?, predicted = ?, error = NULL WHERE uid = ?", ("sending", time.time(), uid)),
        )

    # sends
    def due(self, now: float | None = None) -> list[dict]:
        now = time.time() if now is None else now
        return self._rows("SELECT * FROM sends WHERE state = 'pending' AND next_try <= ? ORDER BY next_try, study_uid", (now,))

    def sent(self, destination: str, sop_uid: str) -> None:
        self._write(("UPDATE sends SET state = 'sent', sent = ?, error = NULL WHERE destination = ? AND sop_uid = ?",
                     (time.time(), destination, sop_uid)))  # fmt: skip

    def failed_send(self, destination: str, sop_uid: str, error: str, backoff: float) -> float:
        """One more failed try: the next one waits backoff * 2**(attempts - 1), at most MAX_WAIT; returns the wait."""
        row = self._rows("SELECT attempts FROM sends WHERE destination = ? AND sop_uid = ?", (destination, sop_uid))[0]
        wait = min(backoff * 2.0 ** min(row["attempts"], 40), MAX_WAIT)
        self._write(("UPDATE sends SET attempts = attempts + 1, next_try = ?, error = ? WHERE destination = ? AND sop_uid = ?",
                     (time.time() + wait, error, destination, sop_uid)))  # fmt: skip
        return wait

    def refused(self, destination: str, sop_uid: str, error: str) -> None:
        """A send that no retry can make (the destination takes no object of its kind, the file is gone): kept, not tried."""
        sql = "UPDATE sends SET state = 'refused', attempts = attempts + 1, error = ? WHERE destination = ? AND sop_uid = ?"
        self._write((sql, (error, destination, sop_uid)))

    def finish_sent(self) -> list[str]:
        """Studies sending with no send pending: done (returned)."""
        rows = self._rows(
            "SELECT uid FROM studies WHERE state = 'sending' AND NOT EXISTS "
            "(SELECT 1 FROM sends WHERE sends.study_uid = studies.uid AND sends.state = 'pending')"
        )
        for row in rows:
            self.set_state(row["uid"], "done")
        return [row["uid"] for row in rows]

    def pending(self) -> int:
        """Work left: studies not done or failed, plus sends not sent."""
        rows = self._rows("SELECT (SELECT COUNT(*) FROM studies WHERE state NOT IN ('done', 'failed')) "
                          "+ (SELECT COUNT(*) FROM sends WHERE state = 'pending') AS n")  # fmt: skip
        return int(rows[0]["n"])

    # a polled server's studies
    def destinations(self) -> list[str]:
        """Where pending sends go: a restart with other destinations still owes these."""
        return [r["destination"] for r in self._rows("SELECT DISTINCT destination FROM sends WHERE state = 'pending'")]

    def seen(self, uid: str) -> dict | None:
        rows = self._rows("SELECT * FROM seen WHERE uid = ?", (uid,))
        return rows[0] if rows else None

    def saw(self, uid: str, instances: int, now: float | None = None) -> None:
        """A polled study's instance count; `changed` moves only when the count does (its quiet time starts again)."""
        now = time.time() if now is None else now
        sql = ("INSERT INTO seen VALUES (?, ?, ?) ON CONFLICT(uid) DO UPDATE SET changed = excluded.changed, "
               "instances = excluded.instances WHERE seen.instances != excluded.instances AND seen.instances >= 0")  # fmt: skip
        self._write((sql, (uid, instances, now)))

    def baseline(self, uids) -> bool:
        """The first search of a polled server: its studies then are there before the node (instances -1: never
        predicted). False (nothing written) when the baseline was taken before."""
        if self._rows("SELECT 1 FROM meta WHERE key = 'baseline'"):
            return False
        self._write(
            *[("INSERT OR IGNORE INTO seen VALUES (?, -1, 0)", (uid,)) for uid in uids],
            ("INSERT INTO meta VALUES ('baseline', ?)", (str(time.time()),)),
        )
        return True

    def table(self) -> list[dict]:
        """Every study with its sends counted: what `siimcovid serve status` prints."""
        return self._rows(
            "SELECT s.uid, s.state, s.instances, s.bytes, s.received, s.predicted, s.finished, s.error, "
            "(SELECT COUNT(*) FROM sends d WHERE d.study_uid = s.uid AND d.state = 'sent') AS sent, "
            "(SELECT COUNT(*) FROM sends d WHERE d.study_uid = s.uid AND d.state = 'pending') AS unsent, "
            "(SELECT COUNT(*) FROM sends d WHERE d.study_uid = s.uid AND d.state = 'refused') AS refused, "
            "(SELECT MAX(d.error) FROM sends d WHERE d.study_uid = s.uid AND d.state != 'sent') AS send_error "
            "FROM studies s ORDER BY s.received"
        )
