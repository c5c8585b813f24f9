"""A disk that fails on demand (tests/tools/eio.c, LD_PRELOAD): while `failing`, every write
and fsync under a directory returns EIO, as a dying SD card does; reads keep working."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from tests.shims import build


class FailingDisk:
    def __init__(self, directory: Path, workdir: Path) -> None:
        self.library = build("eio.c", workdir / "libeio.so")
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
