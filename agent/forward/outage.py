"""Cloud outages you can alert on: pure decisions with `now` passed in (no I/O, no clock).

The forwarder records when the cloud stopped acknowledging (`failing_since`); these functions
turn that, and the age of the oldest unsent chunk, into a problem line once it passes
`forward.alert_after_s`, and into the INFO line logged when the cloud comes back.
"""

from __future__ import annotations

from agent.core.text import duration_words, rfc3339


def outage_problems(
    *,
    now: float,
    alert_after_s: float,
    failing_since: float | None,
    last_error: str | None,
    oldest_unsent_at: float | None,
) -> list[str]:
    """Problems for /readyz and /status once the cloud has failed, or the backlog has waited,
    for alert_after_s or longer; each with its age and when it started."""
    problems = []
    if failing_since is not None and now - failing_since >= alert_after_s:
        problems.append(
            f"cloud unreachable for {duration_words(now - failing_since)} (since "
            f"{rfc3339(failing_since)}, forward.alert_after_s = {alert_after_s:g})"
            + (f": {last_error}" if last_error else "")
        )
    if oldest_unsent_at is not None and now - oldest_unsent_at >= alert_after_s:
        problems.append(
            f"oldest unsent chunk is {duration_words(now - oldest_unsent_at)} old (since "
            f"{rfc3339(oldest_unsent_at)}, forward.alert_after_s = {alert_after_s:g})"
        )
    return problems


def recovery_line(*, now: float, failing_since: float, failed_attempts: int, backlog: int) -> str:
    """'cloud back after 27 min (41 failed attempts), draining 51,200 chunks'."""
    return (
        f"cloud back after {duration_words(max(0.0, now - failing_since))} "
        f"({failed_attempts} failed attempt{'s' if failed_attempts != 1 else ''}), "
        f"draining {backlog:,} chunks"
    )
