"""The label store: candidates to review, their labels and the full label history.

One schema, two engines: SQLite by default (a file, WAL journal, busy timeout, so several
reviewers and the service can write at once) and PostgreSQL through a ``postgresql://`` URL
(psycopg 3). Every label is appended to ``labels`` (who, when, the model version and the score
the reviewer saw, the label it replaced) and mirrored into ``candidates.label`` in the same
transaction, so the history is complete and the current state is one indexed column. Undo is
itself an appended row; nothing is ever updated away.

Labels use the dataset convention: 1 = real, 0 = bogus (``None`` = not labelled).
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from astrid.errors import AstridError

SCHEMA_VERSION = 1
CHANNELS = ("sci", "ref", "diff")
LABEL_NAMES = {1: "real", 0: "bogus"}
LABEL_VALUES = {"real": 1, "bogus": 0, "1": 1, "0": 0}

LabelState = Literal["any", "unlabelled", "labelled", "real", "bogus"]
SortKey = Literal["id", "score", "-score", "uncertainty", "snr", "-snr", "created"]

_SORT_SQL = {
    "id": "c.id",
    "score": "(c.score IS NULL), c.score, c.id",
    "-score": "(c.score IS NULL), c.score DESC, c.id",
    # Uncertainty sampling: the label helps most where the model is closest to 0.5.
    "uncertainty": "(c.score IS NULL), ABS(c.score - 0.5), c.id",
    "snr": "(c.snr IS NULL), c.snr, c.id",
    "-snr": "(c.snr IS NULL), c.snr DESC, c.id",
    "created": "c.seq",
}

_CANDIDATE_COLUMNS = ("id", "run", "triplet_id", "x", "y", "ra_deg", "dec_deg", "snr", "sign",
                      "score", "model", "label", "labelled_utc", "meta", "created_utc")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS astrid_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS candidates (
    seq {serial},
    id TEXT NOT NULL UNIQUE,
    run TEXT NOT NULL,
    triplet_id TEXT,
    x {real}, y {real}, ra_deg {real}, dec_deg {real}, snr {real}, sign INTEGER,
    score {real},
    model TEXT,
    label INTEGER CHECK (label IN (0, 1)),
    labelled_utc TEXT,
    meta TEXT NOT NULL,
    stamp_size INTEGER NOT NULL,
    stamps {blob} NOT NULL,
    created_utc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS candidates_run ON candidates (run);
CREATE INDEX IF NOT EXISTS candidates_label ON candidates (label);
CREATE INDEX IF NOT EXISTS candidates_score ON candidates (score);
CREATE TABLE IF NOT EXISTS labels (
    id {serial},
    candidate_id TEXT NOT NULL REFERENCES candidates (id),
    action TEXT NOT NULL CHECK (action IN ('label', 'undo')),
    label INTEGER,
    previous_label INTEGER,
    reviewer TEXT NOT NULL,
    created_utc TEXT NOT NULL,
    model TEXT,
    score_shown {real},
    undoes INTEGER
);
CREATE INDEX IF NOT EXISTS labels_candidate ON labels (candidate_id);
CREATE INDEX IF NOT EXISTS labels_reviewer ON labels (reviewer, id);
CREATE TABLE IF NOT EXISTS leases (
    candidate_id TEXT PRIMARY KEY REFERENCES candidates (id),
    reviewer TEXT NOT NULL,
    expires_s {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS skips (
    candidate_id TEXT NOT NULL REFERENCES candidates (id),
    reviewer TEXT NOT NULL,
    created_utc TEXT NOT NULL,
    PRIMARY KEY (candidate_id, reviewer)
);
CREATE VIEW current_labels AS
    SELECT id AS candidate_id, run, label, labelled_utc, score, model FROM candidates
    WHERE label IS NOT NULL;
"""

_DIALECT = {
    "sqlite": {"serial": "INTEGER PRIMARY KEY AUTOINCREMENT", "real": "REAL", "blob": "BLOB"},
    "postgresql": {"serial": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                   "real": "DOUBLE PRECISION", "blob": "BYTEA"},
}


class LabelConflict(AstridError):
    """A label operation that would overwrite another reviewer's later label."""


@dataclass(frozen=True)
class Candidate:
    """One candidate in the store (without its stamps; see :meth:`LabelStore.stamps`)."""

    id: str
    run: str
    triplet_id: str | None
    x: float | None
    y: float | None
    ra_deg: float | None
    dec_deg: float | None
    snr: float | None
    sign: int | None
    score: float | None
    model: str | None
    label: int | None
    labelled_utc: str | None
    meta: dict = field(default_factory=dict)
    created_utc: str | None = None

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in _CANDIDATE_COLUMNS}
        out["label_name"] = LABEL_NAMES.get(self.label)
        return out


@dataclass(frozen=True)
class LabelRecord:
    """One row of the append-only label history."""

    id: int
    candidate_id: str
    action: str  # "label" or "undo"
    label: int | None
    previous_label: int | None
    reviewer: str
    created_utc: str
    model: str | None
    score_shown: float | None
    undoes: int | None

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["label_name"] = LABEL_NAMES.get(self.label)
        return out


def parse_label(value: Any) -> int:
    """``"real"``/``1`` -> 1, ``"bogus"``/``0`` -> 0; anything else is a user error."""
    key = str(value).strip().lower()
    if key not in LABEL_VALUES:
        raise AstridError(f"label must be 'real' or 'bogus' (or 1/0), got {value!r}")
    return LABEL_VALUES[key]


def _now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _finite_or_none(value) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


class LabelStore:
    """Candidates, labels and leases in SQLite or PostgreSQL.

    Open one with :func:`open_store`. All methods are safe to call from many threads and
    from many processes at once; each write is one transaction.
    """

    def __init__(self, url: str, *, pool_size: int = 8):
        self.url = url
        self.engine, self._target = _parse_url(url)
        self._pool: queue.LifoQueue = queue.LifoQueue()
        self._pool_size = pool_size
        self._closed = False
        self._create_schema()

    # -- connections ----------------------------------------------------------------------

    def _connect(self):
        if self.engine == "sqlite":
            conn = sqlite3.connect(self._target, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed label survives a power cut, not only a process crash.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            conn.execute("PRAGMA foreign_keys=ON")
            return conn
        import psycopg

        try:
            return psycopg.connect(self._target, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AstridError(f"{redact_url(self.url)}: cannot connect to PostgreSQL: {first}") from None

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        try:
            conn = self._pool.get_nowait()
        except queue.Empty:
            conn = self._connect()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            # A connection that saw an error may be in a bad state; drop it.
            if ok and not self._closed and self._pool.qsize() < self._pool_size:
                self._pool.put(conn)
            else:
                conn.close()

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[_Cursor]:
        """One transaction. SQLite writes take the write lock up front (BEGIN IMMEDIATE), so
        read-then-write sequences never deadlock; PostgreSQL locks rows with FOR UPDATE."""
        with self._conn() as conn:
            if self.engine == "sqlite":
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield _Cursor(conn, "sqlite")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            else:
                with conn.transaction():
                    yield _Cursor(conn, "postgresql")

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                break

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create_schema(self) -> None:
        ddl = _SCHEMA.format(**_DIALECT[self.engine])
        if self.engine == "postgresql":
            ddl = ddl.replace("CREATE VIEW", "CREATE OR REPLACE VIEW")
        else:
            ddl = ddl.replace("CREATE VIEW", "CREATE VIEW IF NOT EXISTS")
        if self._schema_version() == SCHEMA_VERSION:
            # DDL, even "IF NOT EXISTS", locks tables (PostgreSQL); never run it needlessly
            # while reviewers are writing.
            return
        with self._tx(write=True) as cur:
            if self.engine == "postgresql":
                # Several processes may open a fresh database at once; serialise the DDL.
                cur.execute("SELECT pg_advisory_xact_lock(87163)")
            for statement in filter(str.strip, ddl.split(";")):
                cur.execute(statement)
            if cur.execute("SELECT COUNT(*) FROM astrid_schema").fetchone()[0] == 0:
                cur.execute("INSERT INTO astrid_schema (version) VALUES (?)", (SCHEMA_VERSION,))

    def _schema_version(self) -> int | None:
        exists = ("SELECT to_regclass('astrid_schema') IS NOT NULL" if self.engine == "postgresql"
                  else "SELECT COUNT(*) FROM sqlite_master WHERE name = 'astrid_schema'")
        with self._tx() as cur:
            if not cur.execute(exists).fetchone()[0]:
                return None
            row = cur.execute("SELECT MAX(version) FROM astrid_schema").fetchone()
        if row[0] is not None and row[0] > SCHEMA_VERSION:
            raise AstridError(f"{redact_url(self.url)}: label store schema version {row[0]} is "
                              f"newer than this AstrID ({SCHEMA_VERSION}); upgrade AstrID")
        return row[0]

    @property
    def _lock(self) -> str:
        return " FOR UPDATE" if self.engine == "postgresql" else ""

    # -- candidates -----------------------------------------------------------------------

    def add_candidates(self, stamps: np.ndarray, meta: pd.DataFrame, run: str,
                       scores: Sequence[float] | None = None, model: str | None = None,
                       ids: Sequence[str] | None = None) -> list[str]:
        """Add candidates with their raw triplets; existing ids are left as they are.

        Parameters
        ----------
        stamps : (N, 3, S, S) float32 raw pixels, channels ``sci, ref, diff``.
        meta : N rows; ``x, y, ra, dec, snr, sign, triplet_id`` are used when present and
            every column is kept in the candidate's ``meta``.
        run : the run or dataset the candidates come from (a filter in the API).
        scores, model : the model's scores and the model version that gave them.
        ids : candidate ids; default ``"{run}:{triplet_id}"`` (or ``"{run}:{row}"``).

        Returns
        -------
        The ids, in input order.
        """
        stamps = np.asarray(stamps, dtype=np.float32)
        if stamps.ndim != 4 or stamps.shape[1] != 3 or stamps.shape[2] != stamps.shape[3]:
            raise AstridError(f"stamps must have shape (N, 3, S, S), got {stamps.shape}")
        n = len(stamps)
        if len(meta) != n:
            raise AstridError(f"{n} stamps but {len(meta)} metadata rows")
        meta = meta.reset_index(drop=True)
        if ids is None:
            tid = meta["triplet_id"] if "triplet_id" in meta else pd.Series(range(n))
            ids = [f"{run}:{t}" for t in tid]
        if len(set(ids)) != n:
            raise AstridError(f"run {run!r}: candidate ids are not unique")
        now = _now_utc()
        rows = []
        records = json.loads(meta.to_json(orient="records", date_format="iso"))
        for i in range(n):
            rec = records[i]
            score = None if scores is None else _finite_or_none(scores[i])
            sign = rec.get("sign")
            rows.append((
                str(ids[i]), run,
                None if rec.get("triplet_id") is None else str(rec["triplet_id"]),
                _finite_or_none(rec.get("x")), _finite_or_none(rec.get("y")),
                _finite_or_none(rec.get("ra", rec.get("ra_deg"))),
                _finite_or_none(rec.get("dec", rec.get("dec_deg"))),
                _finite_or_none(rec.get("snr")),
                None if sign is None else int(sign),
                score, model if score is not None else None,
                json.dumps(rec), stamps.shape[-1], stamps[i].tobytes(), now,
            ))
        with self._tx(write=True) as cur:
            cur.executemany(
                "INSERT INTO candidates (id, run, triplet_id, x, y, ra_deg, dec_deg, snr, sign,"
                " score, model, meta, stamp_size, stamps, created_utc)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO NOTHING", rows)
        return [str(i) for i in ids]

    def set_scores(self, ids: Sequence[str], scores: Sequence[float], model: str) -> None:
        """Record new model scores (after a model is promoted)."""
        rows = [(_finite_or_none(s), model, str(i)) for i, s in zip(ids, scores, strict=True)]
        with self._tx(write=True) as cur:
            cur.executemany("UPDATE candidates SET score = ?, model = ? WHERE id = ?", rows)

    def get(self, candidate_id: str) -> Candidate | None:
        with self._tx() as cur:
            row = cur.execute(f"SELECT {_cols('c')} FROM candidates c WHERE c.id = ?",
                              (candidate_id,)).fetchone()
        return None if row is None else _candidate(row)

    def stamps(self, ids: Sequence[str]) -> np.ndarray:
        """Raw triplets (N, 3, S, S) float32 for ``ids``, in that order."""
        ids = [str(i) for i in ids]
        found: dict[str, np.ndarray] = {}
        with self._tx() as cur:
            for chunk in _chunks(ids, 500):
                marks = ", ".join("?" * len(chunk))
                for cid, size, blob in cur.execute(
                        f"SELECT id, stamp_size, stamps FROM candidates WHERE id IN ({marks})",
                        tuple(chunk)).fetchall():
                    found[cid] = np.frombuffer(bytes(blob), dtype=np.float32).reshape(3, size, size)
        missing = [i for i in ids if i not in found]
        if missing:
            raise KeyError(f"unknown candidate ids: {missing[:5]}")
        if not ids:
            return np.zeros((0, 3, 63, 63), np.float32)
        return np.stack([found[i] for i in ids])

    def query(self, *, run: str | None = None, score_min: float | None = None,
              score_max: float | None = None, label: LabelState = "any",
              sort: SortKey = "id", limit: int = 100, offset: int = 0) -> tuple[list[Candidate], int]:
        """Candidates matching the filters, and how many match in total."""
        where, params = ["1 = 1"], []
        if run is not None:
            where.append("c.run = ?")
            params.append(run)
        if score_min is not None:
            where.append("c.score >= ?")
            params.append(float(score_min))
        if score_max is not None:
            where.append("c.score <= ?")
            params.append(float(score_max))
        where.append({"any": "1 = 1", "unlabelled": "c.label IS NULL",
                      "labelled": "c.label IS NOT NULL", "real": "c.label = 1",
                      "bogus": "c.label = 0"}[label])
        cond = " AND ".join(where)
        with self._tx() as cur:
            total = cur.execute(f"SELECT COUNT(*) FROM candidates c WHERE {cond}",
                                tuple(params)).fetchone()[0]
            rows = cur.execute(
                f"SELECT {_cols('c')} FROM candidates c WHERE {cond}"
                f" ORDER BY {_SORT_SQL[sort]} LIMIT ? OFFSET ?",
                (*params, int(limit), int(offset))).fetchall()
        return [_candidate(r) for r in rows], int(total)

    def runs(self) -> list[dict]:
        """Each run with its number of candidates and of labelled candidates."""
        with self._tx() as cur:
            rows = cur.execute("SELECT run, COUNT(*), COUNT(label) FROM candidates"
                               " GROUP BY run ORDER BY run").fetchall()
        return [{"run": r, "candidates": int(n), "labelled": int(k)} for r, n, k in rows]

    # -- labels ---------------------------------------------------------------------------

    def label(self, candidate_id: str, label: int | str, reviewer: str, *,
              model: str | None = None, score_shown: float | None = None) -> LabelRecord:
        """Label a candidate (relabelling keeps the old label as ``previous_label``)."""
        value = parse_label(label)
        reviewer = _check_reviewer(reviewer)
        with self._tx(write=True) as cur:
            row = cur.execute(f"SELECT label FROM candidates WHERE id = ?{self._lock}",
                              (candidate_id,)).fetchone()
            if row is None:
                raise KeyError(candidate_id)
            record = self._append(cur, candidate_id, "label", value, row[0], reviewer,
                                  model, _finite_or_none(score_shown), None)
            cur.execute("DELETE FROM leases WHERE candidate_id = ?", (candidate_id,))
        return record

    def undo(self, reviewer: str, *, lease_s: float = 600.0) -> LabelRecord | None:
        """Undo ``reviewer``'s latest label not yet undone; ``None`` when there is none.

        The candidate goes back to the label it had before (usually none) and is leased to
        the reviewer again, so the review page can show it next.
        """
        reviewer = _check_reviewer(reviewer)
        with self._tx(write=True) as cur:
            last = cur.execute(
                "SELECT l.id, l.candidate_id, l.label, l.previous_label FROM labels l"
                " WHERE l.reviewer = ? AND l.action = 'label'"
                " AND NOT EXISTS (SELECT 1 FROM labels u WHERE u.undoes = l.id)"
                " ORDER BY l.id DESC LIMIT 1", (reviewer,)).fetchone()
            if last is None:
                return None
            label_id, cid, _, previous = last
            current = cur.execute(f"SELECT label FROM candidates WHERE id = ?{self._lock}",
                                  (cid,)).fetchone()[0]
            newer = cur.execute("SELECT reviewer FROM labels WHERE candidate_id = ? AND id > ?"
                                " ORDER BY id DESC LIMIT 1", (cid, label_id)).fetchone()
            if newer is not None:
                # Undoing now would silently overwrite someone else's later decision.
                raise LabelConflict(f"candidate {cid} was labelled again by {newer[0]} after "
                                    f"{reviewer}'s label; not undone")
            record = self._append(cur, cid, "undo", previous, current, reviewer, None, None,
                                  label_id)
            self._upsert_lease(cur, cid, reviewer, time.time() + lease_s)
        return record

    def _append(self, cur, cid, action, label, previous, reviewer, model, score_shown, undoes):
        now = _now_utc()
        row = cur.execute(
            "INSERT INTO labels (candidate_id, action, label, previous_label, reviewer,"
            " created_utc, model, score_shown, undoes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " RETURNING id",
            (cid, action, label, previous, reviewer, now, model, score_shown, undoes)).fetchone()
        cur.execute("UPDATE candidates SET label = ?, labelled_utc = ? WHERE id = ?",
                    (label, now if label is not None else None, cid))
        return LabelRecord(int(row[0]), cid, action, label, previous, reviewer, now, model,
                           score_shown, undoes)

    def history(self, candidate_id: str | None = None) -> list[LabelRecord]:
        """The label history, oldest first (of one candidate, or of all)."""
        sql = ("SELECT id, candidate_id, action, label, previous_label, reviewer, created_utc,"
               " model, score_shown, undoes FROM labels")
        params: tuple = ()
        if candidate_id is not None:
            sql += " WHERE candidate_id = ?"
            params = (candidate_id,)
        with self._tx() as cur:
            rows = cur.execute(sql + " ORDER BY id", params).fetchall()
        return [LabelRecord(*r) for r in rows]

    def current_labels(self) -> dict[str, int]:
        """``{candidate id: label}`` for every labelled candidate."""
        with self._tx() as cur:
            rows = cur.execute("SELECT candidate_id, label FROM current_labels").fetchall()
        return {cid: int(lab) for cid, lab in rows}

    def labelled(self) -> tuple[np.ndarray, pd.DataFrame]:
        """Every labelled candidate: raw triplets and a table (``id, run, label, score, ...``)."""
        with self._tx() as cur:
            rows = cur.execute(f"SELECT {_cols('c')} FROM candidates c WHERE c.label IS NOT NULL"
                               " ORDER BY c.seq").fetchall()
        table = pd.DataFrame([_candidate(r).to_dict() for r in rows],
                             columns=[*_CANDIDATE_COLUMNS, "label_name"])
        return self.stamps(table["id"].tolist()), table

    def counts(self) -> dict[str, int]:
        with self._tx() as cur:
            n, k, real = cur.execute("SELECT COUNT(*), COUNT(label), SUM(CASE WHEN label = 1"
                                     " THEN 1 ELSE 0 END) FROM candidates").fetchone()
            h = cur.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        return {"candidates": int(n), "labelled": int(k), "real": int(real or 0),
                "bogus": int(k) - int(real or 0), "history": int(h)}

    # -- leases (the review queue; the policy is in astrid.serve.queue) -------------------

    def held_lease(self, reviewer: str, run: str | None = None) -> Candidate | None:
        """The unlabelled candidate (of ``run``, if given) ``reviewer`` holds an unexpired
        lease on, if any."""
        in_run, params = ("", ()) if run is None else (" AND c.run = ?", (run,))
        with self._tx() as cur:
            row = cur.execute(
                f"SELECT {_cols('c')} FROM leases l JOIN candidates c ON c.id = l.candidate_id"
                f" WHERE l.reviewer = ? AND l.expires_s > ? AND c.label IS NULL{in_run}"
                " ORDER BY l.expires_s DESC LIMIT 1",
                (reviewer, time.time(), *params)).fetchone()
        return None if row is None else _candidate(row)

    def unclaimed(self, reviewer: str, order: SortKey, limit: int,
                  run: str | None = None) -> list[Candidate]:
        """Unlabelled candidates (of ``run``, if given) nobody else holds and ``reviewer`` has
        not skipped."""
        in_run, params = ("", ()) if run is None else (" AND c.run = ?", (run,))
        with self._tx() as cur:
            rows = cur.execute(
                f"SELECT {_cols('c')} FROM candidates c WHERE c.label IS NULL{in_run}"
                " AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.candidate_id = c.id"
                "                 AND l.expires_s > ? AND l.reviewer <> ?)"
                " AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.candidate_id = c.id"
                "                 AND s.reviewer = ?)"
                f" ORDER BY {_SORT_SQL[order]} LIMIT ?",
                (*params, time.time(), reviewer, reviewer, int(limit))).fetchall()
        return [_candidate(r) for r in rows]

    def try_lease(self, candidate_id: str, reviewer: str, lease_s: float) -> bool:
        """Lease an unlabelled candidate to ``reviewer`` unless someone else holds it.

        The candidate row is locked (PostgreSQL) or the database write-locked (SQLite) for the
        check and the lease together, so two reviewers can never both succeed.
        """
        now = time.time()
        with self._tx(write=True) as cur:
            row = cur.execute(f"SELECT label FROM candidates WHERE id = ?{self._lock}",
                              (candidate_id,)).fetchone()
            if row is None or row[0] is not None:
                return False
            holder = cur.execute("SELECT reviewer, expires_s FROM leases WHERE candidate_id = ?",
                                 (candidate_id,)).fetchone()
            if holder is not None and holder[0] != reviewer and holder[1] > now:
                return False
            self._upsert_lease(cur, candidate_id, reviewer, now + lease_s)
        return True

    def _upsert_lease(self, cur, candidate_id: str, reviewer: str, expires_s: float) -> None:
        cur.execute("INSERT INTO leases (candidate_id, reviewer, expires_s) VALUES (?, ?, ?)"
                    " ON CONFLICT (candidate_id) DO UPDATE SET reviewer = excluded.reviewer,"
                    " expires_s = excluded.expires_s", (candidate_id, reviewer, expires_s))

    def skip(self, candidate_id: str, reviewer: str) -> None:
        """``reviewer`` passes on a candidate: release the lease, never offer it to them again."""
        reviewer = _check_reviewer(reviewer)
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM candidates WHERE id = ?", (candidate_id,)).fetchone() is None:
                raise KeyError(candidate_id)
            cur.execute("DELETE FROM leases WHERE candidate_id = ? AND reviewer = ?",
                        (candidate_id, reviewer))
            cur.execute("INSERT INTO skips (candidate_id, reviewer, created_utc) VALUES (?, ?, ?)"
                        " ON CONFLICT (candidate_id, reviewer) DO NOTHING",
                        (candidate_id, reviewer, _now_utc()))


class _Cursor:
    """The two drivers behind one ``execute`` with ``?`` placeholders."""

    def __init__(self, conn, engine: str):
        self._conn = conn
        self._pg = engine == "postgresql"

    def execute(self, sql: str, params: tuple = ()):
        if self._pg:
            return self._conn.execute(sql.replace("?", "%s"), params)
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        if self._pg:
            with self._conn.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), rows)
        else:
            self._conn.executemany(sql, rows)


def open_store(url: str) -> LabelStore:
    """Open (creating if needed) the label store at ``url``.

    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, a bare file path, or
    ``postgresql://user@host:port/dbname``.
    """
    return LabelStore(url)


def _parse_url(url: str) -> tuple[str, str]:
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql", url
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    elif "://" in url:
        raise AstridError(f"label store URL {url!r}: use sqlite:///FILE or postgresql://...")
    else:
        path = url
    if not path or path == ":memory:":
        raise AstridError("label store: an in-memory SQLite database cannot be shared; give a file")
    Path(path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    return "sqlite", str(Path(path).expanduser())


def redact_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url


def _check_reviewer(reviewer: str) -> str:
    reviewer = (reviewer or "").strip()
    if not reviewer or len(reviewer) > 100:
        raise AstridError("reviewer must be a non-empty name of at most 100 characters")
    return reviewer


def _cols(alias: str) -> str:
    return ", ".join(f"{alias}.{c}" for c in _CANDIDATE_COLUMNS)


def _candidate(row) -> Candidate:
    values = dict(zip(_CANDIDATE_COLUMNS, row, strict=True))
    values["meta"] = json.loads(values["meta"]) if values["meta"] else {}
    return Candidate(**values)


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]

