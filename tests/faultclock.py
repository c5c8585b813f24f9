"""A gateway wall clock that steps on demand (tests/tools/clockshift.c, LD_PRELOAD): the
process's CLOCK_REALTIME reads true time plus `offset_s`; its monotonic clock is untouched."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("tools") / "clockshift.c"


class SteppableClock:
    def __init__(self, workdir: Path) -> None:
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            raise RuntimeError("tests/faultclock.py needs a C compiler (cc) to build its shim")
        self.library = workdir / "libclockshift.so"
        subprocess.run(
            [cc, "-shared", "-fPIC", "-O2", "-o", str(self.library), str(SOURCE), "-ldl"],
            check=True,
        )
        self.file = workdir / "clockshift"
        self.set(0.0)

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "CLOCKSHIFT_FILE": str(self.file)}

    def set(self, offset_s: float) -> None:
        """Step the clock to true time + offset_s (seen within 50 ms)."""
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:.6f}\n")
        tmp.replace(self.file)
