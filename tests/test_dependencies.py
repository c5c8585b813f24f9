"""The README's table of runtime dependencies names exactly what pyproject.toml installs, and
the named stack is there (a package the user named is not dropped to meet a figure of ours)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMED_STACK = {"aiomqtt", "httpx", "pydantic-settings", "uvloop"}  # and aiosqlite: see README


def runtime_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[<>=!~ ;\[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}


def readme_table() -> set[str]:
    text = (ROOT / "README.md").read_text()
    table = text.split("**Dependencies, and what each is for.**", 1)[1].split("\n\n", 2)[1]
    names: set[str] = set()
    for row in table.splitlines()[2:]:
        first = row.split("|")[1]
        names.add(first.split("(")[0].strip().lower())
        names.update(n.lower() for n in re.findall(r"with ([a-z0-9-]+)", first))
    return names


def test_the_readme_lists_every_runtime_dependency_and_no_other() -> None:
    assert readme_table() == runtime_dependencies()


def test_the_named_stack_is_installed_and_aiosqlite_is_explained() -> None:
    assert runtime_dependencies() >= NAMED_STACK
    text = (ROOT / "README.md").read_text()
    assert "**Why not aiosqlite.**" in text
    assert "ThreadRunner" in text
