"""`edge-agent top` in a real pseudo-terminal (tmux) against a real agent, and without one."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cli.exitcodes import Exit
from agent.cli.topview import Sample, ViewOptions, render
from devtools.procs import HOST, free_port, wait_for
from tests.helpers import AgentFactory, publish, wait_delivered


class Tmux:
    """A private tmux server (its own socket) whose one pane runs `top` inside a shell that
    reports top's exit code and whether the terminal settings came back as they were."""

    def __init__(self, tmp_path: Path, width: int = 120, height: int = 40) -> None:
        if shutil.which("tmux") is None:
            raise RuntimeError("tmux not found: apt-get install -y tmux")
        self.socket = f"edge-top-{uuid.uuid4().hex[:8]}"
        self.conf = tmp_path / "tmux.conf"
        # A dead pane stays, so its last screen and exit status can be read.
        self.conf.write_text("set -g remain-on-exit on\nset -g status off\n")
        self.width, self.height = width, height
        self.result_path = tmp_path / "top-exit.txt"

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", str(self.conf), *args],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout  # fmt: skip

    def start(self, *top_args: str) -> None:
        top = shlex.join([sys.executable, "-m", "agent.cli", "top", *top_args])
        out = shlex.quote(str(self.result_path))
        script = (
            # Ctrl-C reaches the shell too: a trap (reset to the default in top) keeps it going.
            f'trap true INT; before=$(stty -g); {top}; rc=$?; [ "$(stty -g)" = "$before" ] '
            f'&& echo "exit $rc, terminal restored" > {out} '
            f'|| echo "exit $rc, terminal NOT restored" > {out}'
        )
        self.tmux(
            "new-session", "-d", "-s", "top", "-x", str(self.width), "-y", str(self.height),
            "sh", "-c", script,
        )  # fmt: skip

    def wait_exit(self) -> str:
        """What the shell around top wrote once top had exited."""

        def written() -> str | None:
            # The shell's `echo > file` creates the file before it writes the line.
            text = self.result_path.read_text().strip() if self.result_path.exists() else ""
            return text or None

        done: str = wait_for(written, timeout_s=20, what="top to exit")
        return done

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_screen(self, pattern: str, timeout_s: float = 20) -> str:
        """Poll the screen until `pattern` (a regex) is on it; the screen."""

        def shows() -> str | None:
            s = self.screen()
            return s if re.search(pattern, s) else None

        try:
            found: str = wait_for(shows, timeout_s=timeout_s, what=f"screen to show {pattern!r}")
        except TimeoutError as e:
            pane = self.tmux(
                "display-message",
                "-p",
                "-t",
                "top",
                "dead=#{pane_dead} running=#{pane_current_command}",
            )
            raise AssertionError(f"{e}; {pane}; the screen:\n{self.screen()}") from None
        return found

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def term(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path, width=120, height=30)
    try:
        yield t
    finally:
        t.kill()


ROW = re.compile(
    r"^(?P<camera>\S+) +(?P<rate>[\d.]+) +(?P<messages>[\d,]+) +(?P<last>\d+ \w+) +"
    r"(?P<skew>[+-][\d.]+|—) +(?P<spread>[\d.]+|—) +(?P<open>\d+)  (?P<state>.+)$"
)


def row(screen: str, camera: str) -> dict[str, str]:
    """The columns of a camera's row in the table."""
    for line in screen.splitlines():
        m = ROW.match(line)
        if m and m["camera"] == camera:
            return m.groupdict()
    raise AssertionError(f"no row for {camera} on the screen:\n{screen}")


def test_top_shows_what_was_published_sorts_and_quits_on_q(
    agents: AgentFactory, tmp_path: Path, term: Tmux
) -> None:
    agent = agents.start()
    # 40 cameras; cam-002's clock is two minutes behind; 2 % of the messages are not JSON.
    expected = publish(
        agents.broker, tmp_path, cameras=40, rate=5, duration_s=2, seed=51,
        clocks=((2, "offset:-120"),), malformed_fraction=0.02,
    )  # fmt: skip
    counted = sum(e.count for e in expected.values())
    wait_delivered(agents.receiver, expected)
    status = agent.status()
    assert status is not None and status["ingest"]["counted"] == counted
    malformed = status["ingest"]["rejects"]["malformed_json"]
    assert malformed > 0

    term.start("--url", f"http://{HOST}:{agent.health_port}", "--interval-s", "0.5", "--silent-s", "600")  # fmt: skip
    screen = term.wait_screen(rf"counted {counted:,}")
    assert "edge-agent top  gw-test" in screen and "\nREADY\n" in screen
    assert f"rejects   malformed_json {malformed:,}" in screen
    assert re.search(r"cameras   40 known, 40 publishing, 0 silent \(> 600 s\), 1 clock suspect", screen)  # fmt: skip
    assert re.search(r"outbox    0 chunks", screen) and "cloud     ok, last answer" in screen
    # Sorted by problem: the camera with the bad clock first.
    table = screen.split("STATE\n", 1)[1].splitlines()
    assert table[0].startswith("cam-002 ") and "CLOCK SUSPECT" in table[0]
    cam2 = row(screen, "cam-002")
    assert -121 < float(cam2["skew"]) < -119 and cam2["state"] == "CLOCK SUSPECT"
    cam2_published = sum(e.count for (cam, _, _), e in expected.items() if cam == "cam-002")
    assert int(cam2["messages"].replace(",", "")) == cam2_published
    # 40 cameras do not fit in 30 lines: the table is cut, and says how many are left out.
    lines = screen.rstrip("\n").splitlines()
    assert len(lines) <= 30
    more = re.search(r"… (\d+) more cameras \(sorted by problem\)", screen)
    assert more is not None
    assert int(more.group(1)) + len(table) - 1 == 40

    term.keys("n")  # sort by name
    screen = term.wait_screen(r"sorted by name")
    table = screen.split("STATE\n", 1)[1].splitlines()
    assert [r.split()[0] for r in table[:3]] == ["cam-000", "cam-001", "cam-002"]

    term.keys("q")
    assert term.wait_exit() == "exit 0, terminal restored"
    assert agent.stop() == 0


def test_top_waits_for_the_agent_and_ctrl_c_restores_the_terminal(
    agents: AgentFactory, term: Tmux
) -> None:
    url = f"http://{HOST}:{agents.health_port}"
    term.start("--url", url, "--interval-s", "0.3")
    term.wait_screen(rf"agent not reachable at {re.escape(url)}: .*retrying")
    agent = agents.start()
    screen = term.wait_screen(r"\nREADY\n")
    assert "edge-agent top  gw-test" in screen and "not reachable" not in screen
    term.keys("C-c")
    assert term.wait_exit() == "exit 0, terminal restored"
    assert "Traceback" not in term.tmux("capture-pane", "-p", "-t", "top", "-S", "-")
    assert agent.stop() == 0


def top_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "top", *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_top_prints_plain_lines_when_stdout_is_not_a_terminal(
    agents: AgentFactory, tmp_path: Path
) -> None:
    agent = agents.start()
    expected = publish(agents.broker, tmp_path, cameras=5, rate=10, duration_s=1, seed=52)
    counted = sum(e.count for e in expected.values())
    wait_delivered(agents.receiver, expected)
    url = f"http://{HOST}:{agent.health_port}"

    once = top_cli("--url", url, "--once")
    assert once.returncode == 0, once.stderr
    assert "\x1b" not in once.stdout  # no terminal control sequences
    assert once.stdout.splitlines()[1] == "READY"
    assert f"counted {counted:,}" in once.stdout and "cameras   5 known" in once.stdout

    two = top_cli("--url", url, "--iterations", "2", "--interval-s", "0.5", "--rows", "2")
    assert two.returncode == 0, two.stderr
    snapshots = re.split(r"\n(?=edge-agent top )", two.stdout)
    assert len(snapshots) == 2
    assert re.search(r"forward   — chunks/s", snapshots[0])  # no rate before a second sample
    assert re.search(r"forward   [\d.,]+ chunks/s", snapshots[1])
    assert "… 3 more cameras" in snapshots[1]
    # `top | head -2`: the reader goes away; top ends quietly.
    cmd = f"{shlex.join([sys.executable, '-m', 'agent.cli', 'top', '--url', url, '--iterations', '3', '--interval-s', '0.3'])} | head -2; echo rc=${{PIPESTATUS[0]}}"  # fmt: skip
    piped = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert piped.stdout.splitlines()[1:] == ["READY", "rc=0"] and piped.stderr == "", piped
    assert agent.stop() == 0

    gone = top_cli("--url", url, "--once")
    assert gone.returncode == Exit.UNREACHABLE and f"agent not reachable at {url}" in gone.stdout


@pytest.mark.e2e
def test_top_bad_options_name_themselves() -> None:
    bad = top_cli("--url", f"http://{HOST}:{free_port()}", "--interval-s", "0")
    assert bad.returncode == 2 and "--interval-s" in bad.stderr and "must be > 0" in bad.stderr
    bad = top_cli("--sort", "size")
    assert bad.returncode == 2 and "--sort" in bad.stderr


def test_ten_thousand_cameras_render_the_worst_that_fit_quickly() -> None:
    """A site at the camera cap: the view stays one screen, worst first, in well under a second."""
    by_id = {
        f"cam-{i:05d}": {
            "last_seen_age_s": 0.5, "messages": 1000 + i, "msgs_per_s": 10.0,
            "skew_s": 0.01, "skew_spread_s": 0.02, "clock_jumps": 0, "windows_open": 3,
            "flags": [],
        }
        for i in range(10_000)
    }  # fmt: skip
    by_id["cam-04242"].update(last_seen_age_s=400.0)  # silent
    by_id["cam-07777"].update(skew_s=-95.0, flags=["clock_suspect"])
    by_id["cam-00001"].update(skew_s=45.0, flags=["clock_suspect"])
    by_id["cam-00500"].update(skew_s=10.0)  # off, but within max_skew_s: not a problem yet
    by_id["cam-00600"].update(clock_jumps=2)  # its clock stepped: a problem
    status = {"gateway_id": "gw", "ready": True, "problems": [], "ingest": {"counted": 1}}
    cur = Sample(at=10.0, status=status, cameras={"count": 10_000, "by_id": by_id})
    started = time.perf_counter()
    lines = render(None, cur, ViewOptions(url="http://x", width=100, height=40))
    took = time.perf_counter() - started
    assert len(lines) == 40 and all(len(text) <= 100 for text, _ in lines)
    table = [text for text, _ in lines if text.startswith("cam-")]
    worst = ["cam-04242", "cam-07777", "cam-00001", "cam-00600", "cam-00500"]
    assert [t.split()[0] for t in table[:5]] == worst
    assert lines[-1][0] == f"… {10_000 - len(table):,} more cameras (sorted by problem)"
    assert "1 silent (> 30 s), 2 clock suspect" in "\n".join(text for text, _ in lines)
    assert took < 1.0, took
