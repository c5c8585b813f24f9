"""The outbox as the async pipeline sees it: agent/durable/store.py's transactions, run off the
loop.

Every call is one transaction of the synchronous Store, executed by a Runner: in the agent, one
worker thread (so statements never interleave and the event loop never blocks on an fsync); in
the deterministic simulation, inline on the loop, with a hook at each call where a crash or a
stop may land. A caller cancelled while its transaction runs does not cancel the transaction:
the result is simply not seen by that caller (the Store's cached counters stay right).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from agent.core.errors import OutboxError
from agent.durable.store import (
    Batch,
    CheckpointWrite,
    Recovery,
    RoomMade,
    Store,
    WindowKey,
    is_full,
)

__all__ = [
    "Batch",
    "CheckpointWrite",
    "Outbox",
    "OutboxError",
    "Recovery",
    "RoomMade",
    "Runner",
    "ThreadRunner",
    "WindowKey",
]

T = TypeVar("T")


class Runner(Protocol):
    async def run(self, name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T: ...

    def close(self) -> None: ...


class ThreadRunner:
    """One worker thread for every transaction of the outbox, in call order."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outbox")

    async def run(self, name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(*args, **kw))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Outbox:
    """Durable queue of encoded chunks, the cut batch, and the checkpoint's bookkeeping."""

    def __init__(self, store: Store, runner: Runner) -> None:
        self.store = store
        self._runner = runner

    async def _run(self, name: str, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """One transaction on the runner; SQLite's errors come out as OutboxError only.

        Raised outside the `except`: the new error carries no reference to SQLite's, whose
        traceback holds the transaction's frames (a failing disk's retries leaked memory)."""
        try:
            return await self._runner.run(name, fn, *args, **kw)
        except sqlite3.Error as e:
            err = OutboxError(str(e), full=is_full(e))
        except OSError as e:
            # The seq reservation beside the database (plain file I/O, fsynced): a failing or
            # full disk there is the outbox failing too, not an end of the agent.
            err = OutboxError(
                f"{e.strerror or e} ({e.filename or 'outbox'})",
                full=e.errno in (errno.ENOSPC, errno.EDQUOT),
            )
        raise err

    @classmethod
    async def open(
        cls,
        path: Path,
        *,
        synchronous: str = "full",
        runner: Runner | None = None,
        now: float | None = None,
        store_cls: type[Store] = Store,
    ) -> tuple[Outbox, Recovery]:
        runner = runner or ThreadRunner()
        err: OutboxError | None = None
        try:
            store, recovery = await runner.run(
                "open", store_cls.open, path, synchronous=synchronous, now=now
            )
        except sqlite3.Error as e:
            runner.close()
            err = OutboxError(f"cannot open {path}: {e}")
        except BaseException:
            runner.close()
            raise
        if err is not None:
            raise err
        return cls(store, runner), recovery

    def set_fault(self, hook: Callable[[str], None]) -> None:
        """The crash-test hook at the store's fault points (agent/app/faults.py)."""
        self.store.fault = hook

    # Cached figures, read without a round trip to the worker.
    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def chunk_count(self) -> int:
        return self.store.chunk_count

    @property
    def chunk_bytes(self) -> int:
        return self.store.chunk_bytes

    @property
    def oldest_created_at(self) -> float | None:
        return self.store.oldest_created_at

    @property
    def dead_letter_count(self) -> int:
        return self.store.dead_letter_count

    @property
    def last_seq(self) -> int:
        return self.store.last_seq

    @property
    def batch(self) -> Batch | None:
        return self.store.batch

    @property
    def page_size(self) -> int:
        return self.store.page_size

    @property
    def max_pages(self) -> int:
        return self.store.max_pages

    @property
    def problem(self) -> str | None:
        """Something wrong with the file itself (deleted under the agent), for /readyz."""
        return self.store.problem

    @property
    def txn_budget(self) -> int:
        """Bytes one transaction may write (within the WAL allowance)."""
        return self.store.txn_budget

    @property
    def effective_max_bytes(self) -> int:
        """buffer.max_bytes, or less when the disk has less room (see Store.usage)."""
        return self.store.max_pages * self.store.page_size

    def file_bytes(self) -> int:
        return self.store.file_bytes()

    async def checkpoint(self, w: CheckpointWrite, *, now: float) -> None:
        if w:
            await self._run("checkpoint", self.store.checkpoint, w, now=now)

    async def cut(
        self, *, gateway_id: str, max_chunks: int, max_bytes: int, now: float
    ) -> Batch | None:
        return await self._run(
            "cut",
            self.store.cut,
            gateway_id=gateway_id,
            max_chunks=max_chunks,
            max_bytes=max_bytes,
            now=now,
        )

    async def acknowledged(self, b: Batch) -> None:
        await self._run("acknowledged", self.store.acknowledged, b)

    async def release(self, b: Batch) -> None:
        await self._run("release", self.store.release, b)

    async def dead_letter(self, b: Batch, *, status: int | None, response: str) -> None:
        await self._run("dead_letter", self.store.dead_letter, b, status=status, response=response)

    async def set_quota(self, max_bytes: int) -> None:
        await self._run("set_quota", self.store.set_quota, max_bytes)

    async def usage(self) -> float:
        return await self._run("usage", self.store.usage)

    async def make_room(self, *, target: float, drop_oldest: bool) -> RoomMade:
        return await self._run(
            "make_room", self.store.make_room, target=target, drop_oldest=drop_oldest
        )

    async def refresh_counts(self) -> None:
        await self._run("refresh_counts", self.store.refresh_counts)

    async def save_marks(self, marks: dict[str, Any]) -> None:
        await self._run("save_marks", self.store.save_marks, marks)

    async def mark_session(self, session: str) -> None:
        await self._run("mark_session", self.store.mark_session, session)

    async def clear_marks(self) -> None:
        await self._run("clear_marks", self.store.clear_marks)

    async def clear_history(self) -> None:
        await self._run("clear_history", self.store.clear_history)

    async def close(self) -> None:
        try:
            await self._run("close", self.store.close)
        finally:
            self._runner.close()
