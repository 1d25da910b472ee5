"""The run's state store: one SQLite database (WAL mode) in the run directory.

It records, for every item (a pair, or ``*`` for whole-run stages) and every stage, whether the
stage succeeded, the digest of what it was computed from (its settings plus the checksums of
its inputs), the files it wrote with their sha256, and the reason when it failed. A rerun
trusts a record only when that digest still matches and every recorded file still has its
checksum; everything else is redone. Every run appends a row to ``runs`` and one event per
stage and item to ``events``, so the history of a run directory is never overwritten.

Only the orchestrating process writes here; workers return their records to it. SQLite over a
network file system is not safe, so keep the run directory's state on a local disk.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from astrid.errors import AstridError

STATE_FILE = "state.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id INTEGER PRIMARY KEY AUTOINCREMENT,
    started_utc TEXT NOT NULL,
    finished_utc TEXT,
    command TEXT,
    config_hash TEXT,
    config_json TEXT,
    versions_json TEXT,
    status TEXT
);
CREATE TABLE IF NOT EXISTS items (
    item TEXT PRIMARY KEY,
    data_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    stage TEXT NOT NULL,
    item TEXT NOT NULL,
    status TEXT NOT NULL,
    input_digest TEXT NOT NULL,
    outputs_json TEXT NOT NULL,
    dropped INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    traceback TEXT,
    elapsed_s REAL,
    run_id INTEGER,
    finished_utc TEXT,
    PRIMARY KEY (stage, item)
);
CREATE TABLE IF NOT EXISTS events (
    run_id INTEGER NOT NULL,
    stage TEXT NOT NULL,
    item TEXT NOT NULL,
    action TEXT NOT NULL,
    error TEXT,
    elapsed_s REAL
);
"""

# What happened to a (stage, item) in one run.
DONE, SKIPPED, FAILED, BLOCKED = "done", "skipped", "failed", "blocked"


@dataclass(frozen=True)
class StageRecord:
    """The outcome of one stage for one item.

    ``outputs`` maps paths relative to the run directory to their sha256. ``dropped`` means
    the outputs were deleted on purpose (raw files in streaming mode): their checksums still
    define the downstream digests but are no longer verified on disk.
    """

    stage: str
    item: str
    status: str  # "ok" or "failed"
    input_digest: str
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None
    elapsed_s: float = 0.0
    dropped: bool = False
    run_id: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Event:
    """What one run did with one (stage, item): done, skipped (verified), failed or blocked."""

    stage: str
    item: str
    action: str
    error: str | None = None
    elapsed_s: float = 0.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class StateStore:
    """The SQLite state of one run directory (open with :func:`open_state`)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable in WAL mode against process kills (only an OS crash can lose
            # the last commits, and then the outputs are simply recomputed).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise AstridError(f"{self.path}: not a usable state store ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- runs -------------------------------------------------------------------------------
    def begin_run(self, command: str, config_hash: str, config: dict, versions: dict) -> int:
        cur = self._db.execute(
            "INSERT INTO runs (started_utc, command, config_hash, config_json, versions_json,"
            " status) VALUES (?, ?, ?, ?, ?, 'running')",
            (_now(), command, config_hash, json.dumps(config, sort_keys=True, default=str),
             json.dumps(versions, sort_keys=True)))
        return int(cur.lastrowid)

    def end_run(self, run_id: int, status: str) -> None:
        self._db.execute("UPDATE runs SET finished_utc = ?, status = ? WHERE run_id = ?",
                         (_now(), status, run_id))

    def runs(self) -> list[dict]:
        cur = self._db.execute("SELECT run_id, started_utc, finished_utc, command, config_hash,"
                               " versions_json, status FROM runs ORDER BY run_id")
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    # -- items ------------------------------------------------------------------------------
    def put_items(self, items: dict[str, dict]) -> None:
        """Remember each item's description (inputs, sn, mission...) for reports."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR REPLACE INTO items (item, data_json) VALUES (?, ?)",
                [(k, json.dumps(v, sort_keys=True, default=str)) for k, v in items.items()])

    def items(self) -> dict[str, dict]:
        rows = self._db.execute("SELECT item, data_json FROM items ORDER BY item").fetchall()
        return {item: json.loads(data) for item, data in rows}

    # -- records ----------------------------------------------------------------------------
    def get(self, stage: str, item: str) -> StageRecord | None:
        row = self._db.execute(
            "SELECT stage, item, status, input_digest, outputs_json, error, traceback, elapsed_s,"
            " dropped, run_id FROM records WHERE stage = ? AND item = ?", (stage, item)).fetchone()
        return _record(row) if row else None

    def records(self, stage: str | None = None) -> list[StageRecord]:
        sql = ("SELECT stage, item, status, input_digest, outputs_json, error, traceback,"
               " elapsed_s, dropped, run_id FROM records")
        args: tuple = ()
        if stage is not None:
            sql += " WHERE stage = ?"
            args = (stage,)
        return [_record(row) for row in self._db.execute(sql + " ORDER BY stage, item", args)]

    def save(self, records: Iterable[StageRecord], events: Iterable[Event], run_id: int) -> None:
        """Store a task's records and events in one transaction (all or nothing)."""
        with self._transaction():
            for rec in records:
                self._db.execute(
                    "INSERT OR REPLACE INTO records (stage, item, status, input_digest,"
                    " outputs_json, dropped, error, traceback, elapsed_s, run_id, finished_utc)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rec.stage, rec.item, rec.status, rec.input_digest,
                     json.dumps(rec.outputs, sort_keys=True), int(rec.dropped), rec.error,
                     rec.traceback, rec.elapsed_s, run_id, _now()))
            self._db.executemany(
                "INSERT INTO events (run_id, stage, item, action, error, elapsed_s)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(run_id, e.stage, e.item, e.action, e.error, e.elapsed_s) for e in events])

    def events(self, run_id: int | None = None) -> list[Event]:
        """The events of one run (default: the latest run)."""
        if run_id is None:
            row = self._db.execute("SELECT MAX(run_id) FROM runs").fetchone()
            run_id = row[0] if row else None
        rows = self._db.execute("SELECT stage, item, action, error, elapsed_s FROM events"
                                " WHERE run_id = ? ORDER BY rowid", (run_id,)).fetchall()
        return [Event(*row) for row in rows]

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self):
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *rest):
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _record(row) -> StageRecord:
    stage, item, status, digest, outputs, error, tb, elapsed, dropped, run_id = row
    return StageRecord(stage=stage, item=item, status=status, input_digest=digest,
                       outputs=json.loads(outputs), error=error, traceback=tb,
                       elapsed_s=elapsed or 0.0, dropped=bool(dropped), run_id=run_id)


def open_state(run_dir: Path, *, create: bool = True) -> StateStore:
    """Open (or create) the state store of ``run_dir``."""
    path = Path(run_dir) / STATE_FILE
    if not create and not path.exists():
        raise AstridError(f"{run_dir}: not a run directory (no {STATE_FILE})")
    path.parent.mkdir(parents=True, exist_ok=True)
    return StateStore(path)
