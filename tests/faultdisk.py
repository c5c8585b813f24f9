"""A disk that fails on demand (tests/tools/eio.c, LD_PRELOAD): while `failing`, every write
and fsync under a directory returns EIO, as a dying SD card does; reads keep working."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

SOURCE = Path(__file__).with_name("tools") / "eio.c"


class FailingDisk:
    def __init__(self, directory: Path, workdir: Path) -> None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("tests/faultdisk.py needs a C compiler (cc) to build its shim")
        self.library = workdir / "libeio.so"
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-o", str(self.library), str(SOURCE), "-ldl"],
            check=True,
        )
        self.control = workdir / "eio.on"
        self.directory = directory.resolve()

    def env(self) -> dict[str, str]:
        """What the process under test needs in its environment."""
        return {
            "LD_PRELOAD": str(self.library),
            "EIO_PREFIX": str(self.directory) + os.sep,
            "EIO_CONTROL": str(self.control),
        }

    @contextlib.contextmanager
    def failing(self) -> Iterator[None]:
        self.control.touch()
        try:
            yield
        finally:
            self.control.unlink(missing_ok=True)
