"""The reject reasons: one enum, and docs/reference.md's table names exactly its members."""

from __future__ import annotations

import re
from pathlib import Path

from agent.core.reasons import AGGREGATE_EVENTS, CLOCK_EVENTS, REJECT_REASONS, Reject

README = Path(__file__).resolve().parents[2] / "docs" / "reference.md"


def readme_reject_table() -> set[str]:
    """The names in the first column of the table after "Reject reasons"."""
    text = README.read_text()
    start = text.index("Reject reasons (`ingest.rejects`")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    assert rows, "no table after 'Reject reasons' in docs/reference.md"
    names: set[str] = set()
    for row in rows[2:]:  # past the header and the |---| line
        first = row.split("|")[1]
        names.update(re.findall(r"`([a-z_]+)`", first))
    return names


def test_readme_lists_exactly_the_reject_reasons() -> None:
    listed = readme_reject_table()
    assert listed == {r.value for r in Reject}, (
        f"docs/reference.md lists {sorted(listed - set(Reject))} that are not reasons and misses "
        f"{sorted(set(Reject) - listed)}"
    )


def test_metrics_know_every_reason_and_nothing_is_counted_in_two_places() -> None:
    assert set(REJECT_REASONS) == {r.value for r in Reject}
    assert not set(Reject) & (set(AGGREGATE_EVENTS) | set(CLOCK_EVENTS))
