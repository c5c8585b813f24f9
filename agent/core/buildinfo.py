"""Which build this is: the release version and the git commit it was built from.

A package build (`make deb`, `systemd/install.sh`) stamps the commit into `agent/_build.py` in
its staging copy of the sources, so an installed agent knows it without git. In a checkout
there is no stamp: the commit comes from `git` itself, and is "unknown" when that fails.

    python -m agent.core.buildinfo --stamp DIR [--commit C]  # write DIR/agent/_build.py
    python -m agent.core.buildinfo                           # print version and commit
"""

from __future__ import annotations

import argparse
import functools
import importlib
import subprocess
import sys
from pathlib import Path

from agent import __version__

UNKNOWN = "unknown"
_CHECKOUT = Path(__file__).resolve().parents[2]


def version() -> str:
    """The release version, e.g. "0.1.0"."""
    return __version__


@functools.cache
def commit() -> str:
    """The commit this build came from: 12 hex digits, "-dirty" when built from edited files."""
    try:
        stamp = importlib.import_module("agent._build")
    except ImportError:
        return git_commit(_CHECKOUT)
    value = getattr(stamp, "COMMIT", UNKNOWN)
    return value if isinstance(value, str) and value else UNKNOWN


def labels() -> dict[str, str]:
    """This build as labels: {"version", "commit"} (edge_agent_build_info adds gateway_id)."""
    return {"version": version(), "commit": commit()}


def describe() -> str:
    """One line for `--version` and the start-up log."""
    return f"edge-agent {version()} (commit {commit()})"


def git_commit(checkout: Path) -> str:
    """`git rev-parse` of a checkout, "-dirty" appended if tracked files differ; else "unknown"."""
    if not (checkout / ".git").exists():
        return UNKNOWN
    try:
        head = _git(checkout, "rev-parse", "--short=12", "HEAD")
        dirty = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return f"{head}-dirty" if dirty else head


def _git(checkout: Path, *args: str) -> str:
    r = subprocess.run(
        ["git", "-C", str(checkout), *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return r.stdout.strip()


def stamp(target: Path, commit_id: str) -> Path:
    """Write `target/agent/_build.py`, the stamp `commit()` reads in an installed package."""
    path = target / "agent" / "_build.py"
    path.write_text(
        f'"""Written by agent.buildinfo --stamp at build time."""\n\nCOMMIT = {commit_id!r}\n'
    )
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent.core.buildinfo", description=__doc__)
    p.add_argument("--stamp", metavar="DIR", help="a staging copy of the sources to stamp")
    p.add_argument("--commit", default=None, help="default: this checkout's git commit")
    args = p.parse_args(argv)
    if args.stamp is None:
        print(describe())
        return 0
    target = Path(args.stamp)
    if not (target / "agent" / "__init__.py").is_file():
        print(f"--stamp {target}: no agent/__init__.py there", file=sys.stderr)
        return 2
    commit_id = args.commit or git_commit(_CHECKOUT)
    print(stamp(target, commit_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
