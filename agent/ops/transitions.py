"""The agent's state changes, each logged once: WARNING going wrong, INFO coming back, so that
`journalctl -u edge-agent -p warning` tells the story without /readyz.

Pure: the notify loop passes what it sees every few seconds (the readiness problems, the silent
cameras); this module remembers the last view and logs only what changed. A problem is
recognised across checks by its text with the numbers taken out ("outbox writes failing for 12
s" and "... for 17 s" are one problem), so a growing duration is not a new transition.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("agent.transitions")

# More cameras than this going silent (or coming back) at once: one line naming the first few.
MAX_CAMERAS_NAMED = 10
_NUMBER = re.compile(r"\d[\d.,:]*")


def kind(problem: str) -> str:
    """A problem's identity across checks: its text with every number replaced."""
    return _NUMBER.sub("#", problem)


class Transitions:
    def __init__(self) -> None:
        self._problems: dict[str, str] = {}  # kind -> text when it appeared
        self._not_ready_since: float | None = None
        self._silent: set[str] = set()

    def observe(
        self, *, problems: list[str], silent: set[str], now: float, known: set[str] | None = None
    ) -> None:
        """One look at the agent: `problems` from ready_problems, `silent` the cameras not
        heard from for SILENT_AFTER_S, `now` in seconds (any monotonic clock)."""
        self._readiness(problems, now)
        self._cameras(silent, known)

    def _readiness(self, problems: list[str], now: float) -> None:
        current = {kind(p): p for p in problems}
        if current and self._not_ready_since is None:
            self._not_ready_since = now
            log.warning("NOT READY: %s", "; ".join(problems))
        elif current:
            for k, p in current.items():
                if k not in self._problems:
                    log.warning("NOT READY, also: %s", p)
            for k, p in self._problems.items():
                if k not in current:
                    log.info("no longer: %s", p)
        elif self._not_ready_since is not None:
            log.info("READY again after %.0f s not ready", now - self._not_ready_since)
            self._not_ready_since = None
        self._problems = current

    def _cameras(self, silent: set[str], known: set[str] | None) -> None:
        gone = sorted(silent - self._silent)
        # A silent camera the agent forgot (aggregate.max_cameras, late_memory_s) was not
        # heard from: only those still known are back.
        back = sorted(
            (self._silent - silent) & known if known is not None else self._silent - silent
        )
        if gone:
            log.warning("%s", _cameras_line(gone, "SILENT (no message for 60 s)"))
        if back:
            log.info("%s", _cameras_line(back, "heard from again"))
        self._silent = set(silent)


def _cameras_line(names: list[str], what: str) -> str:
    if len(names) == 1:
        return f"camera {names[0]} {what}"
    shown = ", ".join(names[:MAX_CAMERAS_NAMED])
    more = f" (+{len(names) - MAX_CAMERAS_NAMED} more)" if len(names) > MAX_CAMERAS_NAMED else ""
    return f"{len(names)} cameras {what}: {shown}{more}"
