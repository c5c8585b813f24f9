"""LD_PRELOAD shims for fault tests (tests/tools/*.c), built with the system's C compiler."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

TOOLS = Path(__file__).with_name("tools")


def build(source: str, library: Path) -> Path:
    """Compile tests/tools/<source> into the shared library `library`."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError(f"the fault shim {source} needs a C compiler (cc)")
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(library), str(TOOLS / source), "-ldl"],
        check=True,
    )
    return library
