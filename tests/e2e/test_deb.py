"""The Debian package (`make deb`): build it, inspect it, install it on this machine, run the
unit's commands against a private broker, upgrade it over itself, remove it, purge it.

Marked `deb` (`pytest -m deb`): it needs root and dpkg, creates the edge-agent user and files in
/opt, /etc and /var/lib, and purges the package afterwards, also when it fails. This machine
runs no systemd, which is the case the maintainer scripts must handle for image builds:
deb-systemd-helper records the unit's state, nothing is started.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from agent import __version__
from agent.config.settings import json_schema
from agent.core.buildinfo import git_commit
from devtools.procs import Agent, Mosquitto, Receiver, agent_config, free_port
from tests.helpers import assert_exact, publish, wait_delivered

ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
UNIT = Path("/lib/systemd/system/edge-agent.service")
ETC = Path("/etc/edge-agent")
STATE = Path("/var/lib/edge-agent")
PREFIX = Path("/opt/edge-agent")
DSH_STATE = Path("/var/lib/systemd/deb-systemd-helper-enabled/edge-agent.service.dsh-also")
# A gateway without internet: dpkg runs in a new, empty network namespace.
OFFLINE = ["unshare", "--net"]

pytestmark = pytest.mark.deb


@pytest.fixture(autouse=True, scope="module")
def _can_install() -> None:
    """Skip where a .deb cannot be installed; in CI (CI=true) that is a failure instead."""
    if os.geteuid() != 0:
        why = "installs a .deb on this machine: needs root"
    elif shutil.which("dpkg") is None or shutil.which("dpkg-deb") is None:
        why = "needs dpkg and dpkg-deb (Debian or Ubuntu)"
    elif shutil.which("setpriv") is None or shutil.which("unshare") is None:
        why = "needs setpriv and unshare (util-linux): the service user, an offline install"
    else:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the package test, but it {why}")
    pytest.skip(why)


def run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )


def pyver() -> str:
    return run(PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()


def installed() -> bool:
    r = run("dpkg-query", "-W", "-f=${db:Status-Status}", "edge-agent")
    return r.returncode == 0 and r.stdout not in ("", "not-installed")


def user_exists() -> bool:
    try:
        pwd.getpwnam("edge-agent")
    except KeyError:
        return False
    return True


def group_exists() -> bool:
    try:
        grp.getgrnam("edge-agent")
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        [str(ROOT / "packaging" / "build-deb.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": PYTHON, "OUT": str(out)},
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.is_file() and path.parent == out, r.stdout
    return path


@pytest.fixture
def machine() -> Iterator[None]:
    """Refuse a machine that already has edge-agent; leave none behind."""
    leftovers = [p for p in (PREFIX, ETC, STATE) if p.exists()]
    if installed() or user_exists() or leftovers:
        pytest.fail(
            "edge-agent is already on this machine (package, user or "
            f"{[str(p) for p in leftovers]}); this test installs and purges it: "
            "dpkg --purge edge-agent (or systemd/install.sh --uninstall) first"
        )
    try:
        yield
    finally:
        # Whatever the package got wrong (the test has said so by now), undo it here.
        if installed():
            run("dpkg", "--purge", "edge-agent")
        if user_exists():
            run("deluser", "--system", "--quiet", "edge-agent")
        if group_exists():
            run("delgroup", "--system", "--quiet", "edge-agent")
        for p in (PREFIX, ETC, STATE):
            shutil.rmtree(p, ignore_errors=True)


def mode(p: Path) -> tuple[str, str, int]:
    st = p.stat()
    return (
        pwd.getpwuid(st.st_uid).pw_name,
        grp.getgrgid(st.st_gid).gr_name,
        stat.S_IMODE(st.st_mode),
    )


def unit_commands(key: str) -> list[str]:
    """The installed unit's `key=` command line, split as systemd would (no specifiers here)."""
    lines = [line for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0].partition("=")[2])


def as_service_user(argv: list[str]) -> list[str]:
    """The command as the unit runs it (User=/Group=), exec'd in place so signals reach it."""
    return [
        "setpriv",
        "--reuid=edge-agent",
        "--regid=edge-agent",
        "--init-groups",
        "--reset-env",
        *argv,
    ]


@pytest.mark.timeout(600)  # the first test also builds the package (and lintian reads it)
def test_package_metadata_and_contents(deb: Path, tmp_path: Path) -> None:
    info = run("dpkg-deb", "--info", str(deb))
    assert info.returncode == 0, info.stderr
    fields = dict(
        line.strip().split(": ", 1)
        for line in run("dpkg-deb", "--field", str(deb)).stdout.splitlines()
        if ": " in line and not line.startswith(" ")
    )
    assert fields["Package"] == "edge-agent"
    commit = git_commit(ROOT)
    assert fields["Version"].startswith(f"{__version__}+git")
    assert fields["Version"].endswith(commit.replace("-", ".")), fields["Version"]
    assert f"python{pyver()}" in fields["Depends"].split(", ")
    assert "adduser" in fields["Depends"]
    for script in ("preinst", "postinst", "prerm", "postrm", "conffiles"):
        assert script in info.stdout
    conffiles = run("dpkg-deb", "--info", str(deb), "conffiles").stdout.split()
    assert conffiles == ["/etc/edge-agent/config.toml"]

    listing = run("dpkg-deb", "--contents", str(deb)).stdout
    paths = {line.split()[-1] for line in listing.splitlines() if "->" not in line}
    for want in (
        "./opt/edge-agent/bin/edge-agent",
        "./lib/systemd/system/edge-agent.service",
        "./etc/edge-agent/config.toml",
        f"./opt/edge-agent/lib/python{pyver()}/site-packages/agent/_build.py",
        "./usr/share/edge-agent/config.schema.json",
    ):
        assert want in paths, want
    # The schema an editor reads is this build's model's, and the shipped config passes it.
    unpacked = Path(tmp_path) / "unpacked"
    assert run("dpkg-deb", "-x", str(deb), str(unpacked)).returncode == 0
    shipped_schema = json.loads((unpacked / "usr/share/edge-agent/config.schema.json").read_text())
    assert shipped_schema == json_schema()
    shipped_config = tomllib.loads((unpacked / "etc/edge-agent/config.toml").read_text())
    jsonschema.validate(shipped_config, shipped_schema, jsonschema.Draft7Validator)
    # Pinned: no pip on the gateway, and exactly the locked versions.
    assert "./opt/edge-agent/bin/pip" not in paths
    locked = {
        line.split("==")[0].replace("-", "_").lower() + "-" + line.split("==")[1].split()[0]
        for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line
    }
    shipped = {
        Path(p).name.removesuffix(".dist-info").lower()
        for p in paths
        if p.endswith(".dist-info/") or p.endswith(".dist-info")
    }
    assert locked <= shipped, locked - shipped
    assert {s for s in shipped if not s.startswith("edge_agent-")} == locked

    # preinst refuses, before anything is unpacked, a machine without the interpreter the
    # virtualenv was built with.
    ctrl = Path(tmp_path) / "control"
    assert run("dpkg-deb", "--control", str(deb), str(ctrl)).returncode == 0
    preinst = (ctrl / "preinst").read_text()
    interpreter = f"/usr/bin/python{pyver()}"
    assert interpreter in preinst
    missing = ctrl / "preinst-elsewhere"
    missing.write_text(preinst.replace(interpreter, str(tmp_path / "no-such-python")))
    refused = run("sh", str(missing), "install")
    assert refused.returncode == 1
    assert f"was built for Python {pyver()}" in refused.stderr, refused.stderr

    if shutil.which("lintian"):
        lint = run("lintian", "--no-tag-display-limit", str(deb), timeout_s=300)
        errors = [line for line in lint.stdout.splitlines() if line.startswith(("E:", "W:"))]
        assert errors == [], "\n".join(errors)


@pytest.mark.timeout(600)
def test_install_run_upgrade_remove_purge(
    deb: Path, machine: None, broker: Mosquitto, receiver: Receiver, tmp_path: Path
) -> None:
    # Install, with no network at all (an empty network namespace): the user, the
    # directories, the credentials; nothing enabled or started.
    r = run(*OFFLINE, "dpkg", "-i", str(deb))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Next steps" in r.stdout
    user = pwd.getpwnam("edge-agent")
    assert user.pw_uid < 1000 and user.pw_shell == "/usr/sbin/nologin"
    assert mode(STATE) == ("edge-agent", "edge-agent", 0o750)
    assert mode(ETC) == ("root", "edge-agent", 0o750)
    config = ETC / "config.toml"
    assert mode(config) == ("root", "edge-agent", 0o640)
    assert config.read_text() == (ROOT / "config.example.toml").read_text()
    for cred in ("cloud-token", "mqtt-password"):
        assert mode(ETC / cred) == ("root", "edge-agent", 0o640)
        assert (ETC / cred).read_text() == ""
    assert UNIT.read_text() == (ROOT / "systemd" / "edge-agent.service").read_text()
    assert DSH_STATE.exists()  # deb-systemd-helper knows the unit...
    assert not Path("/etc/systemd/system/multi-user.target.wants/edge-agent.service").exists()

    # The installed program names its build, and checks the shipped config.
    version = run(str(PREFIX / "bin" / "edge-agent"), "--version")
    assert version.stdout.strip() == f"edge-agent {__version__} (commit {git_commit(ROOT)})"
    assert run("/usr/bin/edge-agent", "--version").stdout == version.stdout
    pre = unit_commands("ExecStartPre")
    assert pre[0] == str(PREFIX / "bin" / "edge-agent") and "check-config" in pre
    check = run(*as_service_user(pre))
    # Unedited, the unit does not start: two gateways with the example's id would collide.
    assert check.returncode == 2, check.stdout + check.stderr
    assert "gateway_id = 'site-42-gw-1'" in check.stderr
    config.write_text(
        config.read_text().replace('gateway_id = "site-42-gw-1"', 'gateway_id = "site-7-gw-2"', 1)
    )
    check = run(*as_service_user(pre))
    assert check.returncode == 0, check.stderr
    assert check.stdout == ""  # --quiet: the journal gets problems only

    # A bad edit fails the unit's ExecStartPre with the key, as the service user would see it.
    config.write_text(config.read_text().replace("port = 1883", "port = 70000", 1))
    check = run(*as_service_user(pre))
    assert check.returncode == 2, check.stdout + check.stderr
    assert "mqtt.port" in check.stderr and "70000" in check.stderr

    # The unit's ExecStart, by hand, as the service user, against a private broker and cloud;
    # the outbox in the package's state directory.
    health_port = free_port()
    agent_config(
        path=config,
        gateway_id="gw-test",
        mqtt_port=broker.port,
        receiver_url=receiver.url,
        buffer_path=STATE / "outbox.sqlite3",
        health_port=health_port,
    )
    edited = config.read_text()
    assert mode(config) == ("root", "edge-agent", 0o640)
    assert run(*as_service_user(pre)).returncode == 0
    start = unit_commands("ExecStart")
    assert start[:2] == [str(PREFIX / "bin" / "edge-agent"), "run"]
    agent = Agent(config, tmp_path / "packaged-agent.log", health_port)
    agent.args = as_service_user(start)
    agent.start()
    try:
        agent.wait_ready(timeout_s=30)
        expected = publish(broker, tmp_path, cameras=10, rate=10, duration_s=2, seed=16)
        assert_exact(wait_delivered(receiver, expected))
        status = agent.status()
        assert status is not None and status["version"] == __version__
        assert agent.popen is not None
        pid = agent.popen.pid

        # Upgrade over itself, offline too, with that agent running outside systemd (this
        # machine has none): the edited conffile, the outbox and the user stay, dpkg asks
        # nothing (stdin is /dev/null), and it says plainly that the agent runs the old code.
        r = run(*OFFLINE, "dpkg", "-i", str(deb))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Next steps" not in r.stdout
        assert f"an agent started outside systemd (pid {pid}) still runs" in r.stderr
        assert agent.running
        assert config.read_text() == edited
        assert mode(config) == ("root", "edge-agent", 0o640)
        assert (STATE / "outbox.sqlite3").exists()
        assert pwd.getpwnam("edge-agent").pw_uid == user.pw_uid
        assert run(str(PREFIX / "bin" / "edge-agent"), "--version").returncode == 0

        # Remove, the agent still running: the package stops it (gracefully: exit 0) before
        # deleting its program, and says so; the config, the credentials, the outbox stay.
        r = run("dpkg", "--remove", "edge-agent")
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"stopping the agent started outside systemd (pid {pid})" in r.stderr
        assert "edge-agent: stopped" in r.stderr
        assert not agent.running
    finally:
        rc = agent.stop()
    assert rc == 0, agent.log_text()[-3000:]
    assert f"commit {git_commit(ROOT)}" in agent.log_text()
    assert not PREFIX.exists() and not UNIT.exists()
    assert not Path("/usr/bin/edge-agent").is_symlink()
    assert config.read_text() == edited
    assert (ETC / "cloud-token").exists() and (STATE / "outbox.sqlite3").exists()
    assert mode(STATE / "outbox.sqlite3")[0] == "edge-agent"

    # Purge while a process of the service user still runs: deluser fails, and the package
    # says so (it used to hide it and leave the user behind silently).
    squatter = subprocess.Popen(as_service_user(["sleep", "300"]), stdin=subprocess.DEVNULL)
    try:
        r = run("dpkg", "--purge", "edge-agent")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "the user edge-agent was not deleted" in r.stderr, r.stderr
        assert user_exists()
    finally:
        squatter.kill()
        squatter.wait()
    assert run("deluser", "--system", "--quiet", "edge-agent").returncode == 0
    if group_exists():
        run("delgroup", "--system", "--quiet", "edge-agent")
    # Reinstall and purge with nothing running: nothing of it is left.
    r = run(*OFFLINE, "dpkg", "-i", str(deb))
    assert r.returncode == 0, r.stdout + r.stderr

    # Purge: nothing of it is left.
    r = run("dpkg", "--purge", "edge-agent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not installed()
    left = [
        str(p)
        for p in (
            PREFIX,
            ETC,
            STATE,
            UNIT,
            DSH_STATE,
            Path("/etc/systemd/system/edge-agent.service"),
        )
        if p.exists() or p.is_symlink()
    ]
    assert left == []
    assert not user_exists() and not group_exists()
