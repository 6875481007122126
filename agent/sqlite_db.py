"""SQLite on a thread of its own: what the journal and the embedded store share.

One connection, one worker thread (SQLite connections are not for concurrent use), WAL mode, and one
transaction block. `run(fn, *args)` calls `fn(conn, *args)` on that thread; callers map `sqlite3.Error`
to their own errors.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from agent.lifecycle import Resource

T = TypeVar("T")
Synchronous = Literal["FULL", "NORMAL"]


class SqliteDb(Resource):
    """A SQLite file opened on one worker thread (async context manager).

    `create=False` opens an existing file only (`sqlite3.OperationalError` when it is missing), so a
    reader pointed at the wrong path fails instead of creating an empty database.
    """

    def __init__(self, path: Path, *, synchronous: Synchronous = "FULL", create: bool = True, name: str) -> None:
        self.path = path
        self._synchronous = synchronous
        self._create = create
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    @property
    def is_open(self) -> bool:
        return self._executor is not None

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    def _connect(self) -> None:
        if self._create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        target = self.path if self._create else f"file:{self.path.resolve()}?mode=rw"
        conn = sqlite3.connect(target, uri=not self._create, check_same_thread=False, isolation_level=None,
                               timeout=10.0)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
        except sqlite3.Error:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        """Close the connection and the thread. Safe to call twice."""
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(executor, conn.close)
        executor.shutdown(wait=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(conn, *args)` on the worker thread. Raises RuntimeError when closed, and what `fn` raises."""
        if self._executor is None or self._conn is None:
            raise RuntimeError(f"SQLite database {str(self.path)!r} is not open")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._conn, *args)


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (a failed COMMIT and cancellation included) and
    re-raise: the connection is never left inside a transaction holding the write lock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
