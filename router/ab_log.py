"""The durable A/B log: exposures and outcomes in SQLite (WAL), one file per server process.

Guarantee: a completion response is sent only after its exposure row is committed, and a
``/v1/feedback`` answer only after its outcome row is committed, with ``synchronous=FULL``, so
anything a client has received survives SIGKILL of the server (and an OS crash or power loss,
to the extent the disk honours fsync). Commits are grouped: one writer thread takes every row
queued meanwhile into one transaction, so durability costs one fsync per batch, not per request.

Replicas (the Ray Serve deployment) each write their own shard - by default
``runs/ab/<experiment>.<host>.<pid>.sqlite`` - because SQLite has one writer at a time and a
network file system breaks its locking; ``matta ab analyze`` reads any number of shards and
merges them (request ids are UUIDs, unique across shards). Several processes may also share one
file on a local disk (WAL + a busy timeout serialise them), which the tests exercise too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS exposures (
    request_id TEXT PRIMARY KEY,
    experiment TEXT NOT NULL,
    unit TEXT,                      -- NULL when the request carried no unit id
    assignment TEXT NOT NULL,       -- 'hash' (sticky) or 'random' (no unit id)
    arm TEXT NOT NULL,
    policy TEXT NOT NULL,           -- the arm's policy spec, e.g. 'fixed:ta' or 'slo'
    width TEXT NOT NULL,            -- the width actually served
    status INTEGER NOT NULL,        -- HTTP status returned
    latency_s REAL,                 -- arrival to last token
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    created_unix REAL NOT NULL,
    widths TEXT                     -- every width served, 'width@first token' per change ('ta@0,s@17')
);
CREATE INDEX IF NOT EXISTS exposures_unit ON exposures (experiment, unit);
CREATE TABLE IF NOT EXISTS outcomes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    experiment TEXT NOT NULL,
    request_id TEXT,                -- the exposure it scores, or NULL when given by unit
    unit TEXT,
    metric TEXT NOT NULL,
    value REAL NOT NULL,
    created_unix REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Exposure:
    request_id: str
    experiment: str
    unit: str | None
    assignment: str
    arm: str
    policy: str
    width: str
    status: int
    latency_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_unix: float
    widths: str | None = None  # x-matta-widths: the widths served and the token each began at


_INSERT_EXPOSURE = (f"INSERT OR REPLACE INTO exposures ({', '.join(f.name for f in fields(Exposure))}) "
                    f"VALUES ({', '.join('?' * len(fields(Exposure)))})")


@dataclass(frozen=True)
class Outcome:
    experiment: str
    request_id: str | None
    unit: str | None
    metric: str
    value: float
    created_unix: float


def default_shard_path(experiment: str, directory: str | Path = "runs/ab") -> Path:
    """``<directory>/<experiment>.<host>.<pid>.sqlite``: one shard per server process."""
    import os

    return Path(directory) / f"{experiment}.{socket.gethostname()}.{os.getpid()}.sqlite"


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating) a log file in WAL mode with full fsync and the schema in place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=30000")
    conn.executescript(SCHEMA)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(exposures)")}
    if "widths" not in columns:  # a log written before widths were recorded
        try:
            conn.execute("ALTER TABLE exposures ADD COLUMN widths TEXT")
        except sqlite3.OperationalError:  # another process sharing the file added it meanwhile
            pass
    return conn


class ABLog:
    """Group-committing writer. ``await log.write(row)`` returns once the row is durable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._conn = connect(self.path)
        self._pending: list[tuple[Exposure | Outcome, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="matta-ab-log", daemon=True)
        self._thread.start()

    async def write(self, row: Exposure | Outcome) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the A/B log is closed")
            self._pending.append((row, future, loop))
            self._cond.notify()
        await future

    def write_sync(self, rows: Iterable[Exposure | Outcome]) -> None:
        """Insert and commit now, on the caller's thread (tools and tests)."""
        with self._cond:
            self._insert(list(rows))

    def known_request(self, request_id: str) -> bool:
        with self._cond:
            row = self._conn.execute("SELECT 1 FROM exposures WHERE request_id = ?", (request_id,)).fetchone()
        return row is not None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(30)
        self._conn.close()

    def _insert(self, rows: list[Exposure | Outcome]) -> None:
        exposures = [astuple(r) for r in rows if isinstance(r, Exposure)]
        outcomes = [astuple(r) for r in rows if isinstance(r, Outcome)]
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            if exposures:
                self._conn.executemany(_INSERT_EXPOSURE, exposures)
            if outcomes:
                self._conn.executemany(
                    "INSERT INTO outcomes (experiment, request_id, unit, metric, value, created_unix) "
                    "VALUES (?, ?, ?, ?, ?, ?)", outcomes)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                batch, self._pending = self._pending, []
                if not batch and self._closed:
                    return
                started = time.perf_counter()
                try:
                    self._insert([row for row, _, _ in batch])
                    error = None
                except Exception as exc:  # disk full, locked too long: tell every waiting request
                    log.exception("A/B log commit of %d rows failed", len(batch))
                    error = exc
                log.debug("committed %d rows in %.1f ms", len(batch), 1000 * (time.perf_counter() - started))
            for _, future, loop in batch:
                loop.call_soon_threadsafe(_resolve, future, error)


def _resolve(future: asyncio.Future, error: Exception | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
