"""The store's core: one writer thread, group commit, and what a failed write means.

One thread owns the write connection, so a slow fsync never blocks the event loop and writes
are serialised in the order they were asked for. `Writer.run` is every write's one way in, and
classifies what fails: a full disk is `StorageFull` (the transaction rolled back whole; the
store says it is full in `health()` until a write succeeds again, probing once a second
meanwhile), a damaged file is `StoreCorrupt`. `Writer.run_journaled` also hands the events a
write inserted to the journal's listeners, in seq order.

`GroupCommit` batches callers: those that arrive while a commit is under way share the next
one (one fsync for all), and each gets its answer only once the commit holding it returned.
It knows nothing of SQLite, so any backend can batch its writes the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from whatsappd.logs import get_logger
from whatsappd.store.backend import StorageFull, StoreCorrupt, StoreError
from whatsappd.store.journal import Event
from whatsappd.timefmt import iso

__all__ = ["GroupCommit", "Writer", "delivered_in_order"]

T = TypeVar("T")
A = TypeVar("A")
R = TypeVar("R")
log = get_logger()


def _sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of an sqlite3 error (SQLITE_FULL, ...), None for others."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(exc, sqlite3.Error) and isinstance(code, int) else None


def is_full(exc: BaseException) -> bool:
    return (_sqlite_code(exc) == sqlite3.SQLITE_FULL
            or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)))


def is_corrupt(exc: BaseException) -> bool:
    return _sqlite_code(exc) in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _free_bytes(path: Path) -> int | None:
    """Bytes an unprivileged writer may still use on the filesystem holding path."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


async def delivered_in_order(future: asyncio.Future[tuple[T, list[Event]]], deliver: Callable[[list[Event]], None]) -> T:
    """Await a writer-thread future giving (result, events it inserted); return the result.

    The events go to deliver() from the future's done callback, so they reach listeners in seq
    order (futures of one writer thread complete in order) even if the caller is cancelled
    meanwhile.
    """

    def done(finished: asyncio.Future[tuple[T, list[Event]]]) -> None:
        if not finished.cancelled() and finished.exception() is None:
            deliver(finished.result()[1])

    future.add_done_callback(done)
    result, _ = await asyncio.shield(future)
    return result


class Writer:
    """The writer thread and its connection; the store's full/ok state."""

    def __init__(self, path: Path, corrupt_fix: str, probe: Callable[[sqlite3.Connection], None]) -> None:
        self.path = path
        self._corrupt_fix = corrupt_fix
        self._probe_write = probe  # a tiny write: its success clears `full`
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        #: The write connection, set by the backend once it opened it.
        self.db: sqlite3.Connection | None = None
        #: While the disk is full: when that was first seen, and the last refusal's message.
        self.full_since: float | None = None
        self.full_message = ""
        #: Writes refused because the disk was full, since the daemon started (a metric).
        self.full_refusals = 0
        self._probing = False

    def connection(self) -> sqlite3.Connection:
        if self.db is None:
            raise StoreError("the store is closed")
        return self.db

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(db, *args) on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._write, fn, *args)

    async def run_journaled(self, deliver: Callable[[list[Event]], None],
                            fn: Callable[..., tuple[T, list[Event]]], *args: Any) -> T:
        """Run fn(db, *args) -> (result, events it inserted) on the writer thread; return result,
        the events delivered in seq order (delivered_in_order)."""
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._write, fn, *args)
        return await delivered_in_order(future, deliver)

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(db, *args) on the writer thread, every write's one way in: what fails is classified.

        A full disk raises StorageFull (and the store is `full` until a write succeeds), a
        damaged file StoreCorrupt; both say which file and what to do.
        """
        try:
            result = fn(self.connection(), *args)
        except (sqlite3.Error, OSError) as exc:
            if is_full(exc):
                raise self._refuse_full(exc) from exc
            if is_corrupt(exc):
                raise StoreCorrupt(self.path, str(exc), self._corrupt_fix) from exc
            raise
        if self.full_since is not None:
            self._writable_again()
        return result

    def _writable_again(self) -> None:
        assert self.full_since is not None
        log.info("storage writable again", path=str(self.path),
                 full_for_seconds=round(time.time() - self.full_since, 1), refused=self.full_refusals)
        self.full_since = None

    def _refuse_full(self, exc: BaseException) -> StorageFull:
        free = _free_bytes(self.path.parent)
        message = (f"the disk holding {self.path} is full ({'?' if free is None else free} bytes free): nothing "
                   "was stored; free space there (whatsappd carries on by itself once there is room)")
        self.full_refusals += 1
        self.full_message = message
        if self.full_since is None:
            self.full_since = time.time()
            log.error("storage full: writes are refused until there is room", path=str(self.path),
                      free_bytes=free, error=str(exc))
        return StorageFull(message)

    def probe_if_full(self) -> None:
        """While the disk is full, queue one probe write (from any thread): nothing else may write
        for a while (no client, no event), and health and metrics must not stay stale."""
        if self.full_since is not None and not self._probing:
            self._probing = True
            self._executor.submit(self._probe)

    def _probe(self) -> None:
        try:
            self._probe_write(self.connection())
        except (StoreError, sqlite3.Error, OSError):
            pass  # still full (or worse): the next write or probe says so
        else:
            if self.full_since is not None:
                self._writable_again()
        finally:
            self._probing = False

    def health(self) -> dict[str, Any]:
        """{"state": "ok"} or, while the disk is full, "full" with since, path and message."""
        if self.full_since is None:
            return {"state": "ok", "backend": "sqlite", "path": str(self.path)}
        return {"state": "full", "backend": "sqlite", "path": str(self.path), "since": iso(self.full_since),
                "message": self.full_message}

    async def close(self, fn: Callable[[sqlite3.Connection], None]) -> None:
        """Run fn(db) last on the writer thread (it closes the connection), then end the thread."""
        await self.run(fn)
        self.db = None
        self._executor.shutdown(wait=True)


class GroupCommit(Generic[A, R]):
    """Items submitted while a commit runs share the next commit; each caller is answered after it.

    commit(items) returns one outcome per item, in order: a result, or the exception that item
    alone failed with (undone alone). If commit itself raises, nothing of the batch was
    committed and every caller of that batch gets the error.
    """

    def __init__(self, commit: Callable[[list[A]], Awaitable[list[R | Exception]]]) -> None:
        self._commit = commit
        self._waiting: list[tuple[A, asyncio.Future[R]]] = []
        self._committing: asyncio.Task[None] | None = None

    async def submit(self, item: A) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._committing is None or self._committing.done():
            self._committing = loop.create_task(self._loop())
        # shield: a caller that goes away does not take the others' commit with it
        return await asyncio.shield(future)

    async def _loop(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            try:
                outcomes = await self._commit([item for item, _ in batch])
            except BaseException as exc:  # nothing of this batch committed
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
