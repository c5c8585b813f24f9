"""A disk that keeps only what was fsynced, as after a power cut (tests/tools/lazyfs.c,
LD_PRELOAD; LazyFS in-process).

A process started with `env()` keeps every write to a file under `directory` that it has not
fsynced in its own memory: when it is SIGKILLed, that data is gone, exactly as at a power cut.
Creating, renaming and unlinking files there is durable only after an fsync of the directory:
the shim logs each such change, and `cut()`, called once every process under the shim is dead,
undoes those no directory fsync made durable. The shim's header says what it does not model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests.shims import build


@dataclass(frozen=True)
class _Change:
    op: str  # create, rename, unlink
    paths: tuple[str, ...]  # create: (path,); rename: (old, new, kept); unlink: (path, kept)

    @property
    def directories(self) -> set[str]:
        names = self.paths[:2] if self.op == "rename" else self.paths[:1]
        return {os.path.dirname(p) for p in names}


class PowerCutDisk:
    def __init__(self, directory: Path, workdir: Path) -> None:
        self.library = build("lazyfs.c", workdir / "liblazyfs.so")
        self.directory = directory.resolve()
        self.log = workdir.resolve() / "lazyfs.log"  # outside `directory`, on the same disk

    def env(self) -> dict[str, str]:
        """What the process under test needs in its environment."""
        return {
            "LD_PRELOAD": str(self.library),
            "LAZYFS_PREFIX": str(self.directory),
            "LAZYFS_LOG": str(self.log),
        }

    def cut(self) -> list[str]:
        """The power cut for directory entries, once every process under the shim is dead
        (their unsynced data died with them): undo, newest first, every create, rename and
        unlink that no later fsync of its directory made durable. Returns what was undone."""
        pending = self._pending()
        undone = []
        for change in reversed(pending):
            _undo(change)
            undone.append(f"{change.op} {' '.join(p for p in change.paths if p)}")
        for kept in self.log.parent.glob(self.log.name + ".keep.*"):
            kept.unlink()
        self.log.unlink(missing_ok=True)
        return undone

    def _pending(self) -> list[_Change]:
        try:
            lines = self.log.read_text().splitlines()
        except FileNotFoundError:
            return []
        # In log order: a change, or the directory a sync made durable ("*": all of them).
        changes: list[_Change | str | None] = []
        last_of: dict[str, int] = {}  # a process's latest change, which "cancel" withdraws
        for line in lines:
            pid, op, *rest = line.split("\t")
            if op == "cancel":
                if pid in last_of:
                    changes[last_of.pop(pid)] = None
                continue
            if op in ("sync", "syncall"):
                changes.append(rest[0] if op == "sync" else "*")
                continue
            n = {"create": 1, "rename": 3, "unlink": 2}[op]
            last_of[pid] = len(changes)
            changes.append(_Change(op, tuple(rest[:n])))
        pending: list[_Change] = []
        synced: set[str] = set()  # directories synced after the change at hand
        for change in reversed(changes):
            if isinstance(change, str):
                synced.add(change)
            elif change and "*" not in synced and not change.directories <= synced:
                pending.append(change)
        pending.reverse()
        return pending


def _undo(change: _Change) -> None:
    """Put one entry change back, if it happened (it is logged just before it is made)."""
    if change.op == "create":
        Path(change.paths[0]).unlink(missing_ok=True)
    elif change.op == "rename":
        old, new, kept = change.paths
        if not os.path.lexists(old) and os.path.lexists(new):
            os.rename(new, old)
        if kept and os.path.exists(kept):
            os.rename(kept, new)
    elif change.op == "unlink":
        path, kept = change.paths
        if kept and os.path.exists(kept) and not os.path.lexists(path):
            os.rename(kept, path)
