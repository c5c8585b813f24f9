"""Dead letters, for the CLI: list them, put them back in the outbox.

Synchronous sqlite3 on the outbox file: safe beside a running agent (WAL, busy timeout); the
agent notices re-queued chunks within seconds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def list_dead_letters(path: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(path, timeout=10)
    try:
        rows = con.execute(
            "SELECT seq, created_at, status, response, length(body) FROM dead_letters ORDER BY seq"
        ).fetchall()
    finally:
        con.close()
    return [
        {"seq": s, "created_at": c, "status": st, "response": r, "bytes": n}
        for s, c, st, r, n in rows
    ]


def retry_dead_letters(path: Path, seqs: Sequence[int] | None) -> int:
    """Put dead letters back in the outbox (all, or the given seqs) under new seqs; how many."""
    con = sqlite3.connect(path, timeout=10, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        if seqs is None:
            chosen = [r[0] for r in con.execute("SELECT seq FROM dead_letters ORDER BY seq")]
        else:
            chosen = [
                s for s in seqs
                if con.execute("SELECT 1 FROM dead_letters WHERE seq = ?", (s,)).fetchone()
            ]  # fmt: skip
        for s in chosen:
            con.execute(
                "INSERT INTO chunks (created_at, body) SELECT created_at, body FROM dead_letters"
                " WHERE seq = ?",
                (s,),
            )
            con.execute("DELETE FROM dead_letters WHERE seq = ?", (s,))
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()
    return len(chosen)
