"""A gateway wall clock that steps on demand (tests/tools/clockshift.c, LD_PRELOAD): the
process's CLOCK_REALTIME reads true time plus `offset_s`; its monotonic clock is untouched."""

from __future__ import annotations

from pathlib import Path

from tests.shims import build


class SteppableClock:
    def __init__(self, workdir: Path) -> None:
        self.library = build("clockshift.c", workdir / "libclockshift.so")
        self.file = workdir / "clockshift"
        self.set(0.0)

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "CLOCKSHIFT_FILE": str(self.file)}

    def set(self, offset_s: float) -> None:
        """Step the clock to true time + offset_s (seen within 50 ms)."""
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(f"{offset_s:.6f}\n")
        tmp.replace(self.file)
