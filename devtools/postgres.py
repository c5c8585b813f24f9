"""A private PostgreSQL cluster for tests, benchmarks and the demo: initdb, crash, a full disk.

Each cluster is its own data directory, owned by the `postgres` user (initdb and postgres refuse
to run as root, so both run as that user), listening on 127.0.0.1 only, on a free port, with
trust authentication on loopback and nowhere else, and its unix socket beside the data directory
(never /var/run/postgresql). It neither touches nor needs a PostgreSQL that the machine runs.
Waits poll a condition with a deadline.

It needs root and the server binaries (Debian 12: `apt-get install -y postgresql-15`); it finds
them and says what to install when they are missing, and never installs anything itself.

Layout under `base_dir`: `postgres.log` (initdb's and the server's output, kept after close),
and `pg/` (or `disk/`, a tmpfs of its own size) holding `data/` and the socket.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from devtools.procs import HOST, free_port, wait_for

PG_USER = "postgres"
PG_LIB = Path("/usr/lib/postgresql")
INSTALL_HINT = "apt-get install -y postgresql-15 (Debian 12; the `postgresql` package pulls it in)"
NEEDED_BINARIES = ("initdb", "postgres", "psql")
LOG_NAME = "postgres.log"
# sun_path is 108 bytes with its NUL; the server will not start on a longer socket path.
MAX_SOCKET_PATH = 107

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,  # waits for every client to disconnect
    "fast": signal.SIGINT,  # rolls back open transactions, disconnects, checkpoints
    "immediate": signal.SIGQUIT,  # no checkpoint: the next start runs recovery
}
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")


class PostgresNotInstalled(FileNotFoundError):
    """The server binaries or the `postgres` user are missing; the message says what to install."""


class PsqlError(RuntimeError):
    """psql exited non-zero; the message holds its stderr."""


def find_bindir(roots: Iterable[Path] = (PG_LIB,)) -> Path:
    """The bin directory of the newest installed server with initdb, postgres and psql.

    Looks in `<root>/<major>/bin` (Debian's layout), then beside a `postgres` on PATH. Raises
    PostgresNotInstalled, naming the package to install, when there is none."""
    versions: list[tuple[int, Path]] = []
    for root in roots:
        with contextlib.suppress(OSError):
            versions += [(int(d.name), d / "bin") for d in root.iterdir() if d.name.isdigit()]
    on_path = shutil.which("postgres")
    candidates = [b for _, b in sorted(versions, reverse=True)]
    candidates += [Path(on_path).resolve().parent] if on_path else []
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in NEEDED_BINARIES):
            return bindir
    raise PostgresNotInstalled(
        f"PostgreSQL server binaries ({', '.join(NEEDED_BINARIES)}) not found in "
        f"{', '.join(str(r) + '/*/bin' for r in roots)} nor on PATH: {INSTALL_HINT}"
    )


@dataclass(frozen=True)
class ServerUser:
    """The account that initdb and the server run as."""

    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str

    @classmethod
    def lookup(cls, name: str = PG_USER) -> ServerUser:
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise PostgresNotInstalled(
                f"no `{name}` user on this machine: {INSTALL_HINT}"
            ) from None
        return cls(name, pw.pw_uid, pw.pw_gid, os.getgrouplist(name, pw.pw_gid), pw.pw_dir)

    def can_search(self, st: os.stat_result) -> bool:
        """Whether this user may traverse a directory with this stat (not as root)."""
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def make_reachable(path: Path, user: ServerUser) -> None:
    """Make sure `user` can traverse every directory from / down to `path` (absolute).

    Adds the search bit for others (o+x; never read) only to directories that we own inside the
    system temp directory, such as pytest's 0700 tmp_path; any other obstacle raises
    PermissionError naming it, and nothing is changed."""
    temp = Path(tempfile.gettempdir()).resolve()
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        if user.can_search(st):
            continue
        if st.st_uid == os.geteuid() and d.is_relative_to(temp) and d != temp:
            os.chmod(d, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            continue
        raise PermissionError(
            f"user {user.name} cannot reach {path}: {d} has mode {stat.S_IMODE(st.st_mode):o} "
            f"and is not ours to open up; choose a base_dir under {temp} or a world-searchable path"
        )


def _group_alive(pgid: int) -> bool:
    """Whether a process of this process group is still running (zombies count as gone)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != b"Z":
            return True
    return False


class PostgresCluster:
    """A private cluster: `PostgresCluster.create(base_dir, ...)` runs initdb, `start()` starts it.

    `with PostgresCluster.create(d) as pg:` starts it and, on leaving, stops it (SIGKILL if a
    fast shutdown does not finish in time), unmounts its disk and removes the data directory;
    the log stays. Needs root: the server runs as `postgres`, a disk of its own is a tmpfs."""

    def __init__(
        self,
        base_dir: Path,
        cluster_dir: Path,
        *,
        port: int,
        bindir: Path,
        user: ServerUser,
        disk_bytes: int | None,
    ) -> None:
        """Use create(): this only names the parts."""
        self.base_dir = base_dir
        # Owned by postgres, mode 0700: data/ and the socket; a tmpfs mount point with a disk.
        self.cluster_dir = cluster_dir
        self.data_dir = cluster_dir / "data"
        self.log_path = base_dir / LOG_NAME
        self.port = port
        self.bindir = bindir
        self.user = user
        self.disk_bytes = disk_bytes
        socket = cluster_dir / f".s.PGSQL.{port}"
        # None when the path is too long for a unix socket: then TCP only.
        self.socket_dir: Path | None = (
            cluster_dir if len(os.fsencode(socket)) <= MAX_SOCKET_PATH else None
        )
        self._mounted = False
        self._popen: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(
        cls,
        base_dir: Path,
        *,
        port: int | None = None,
        max_connections: int = 100,
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
        disk_bytes: int | None = None,
        wal_segment_mb: int = 16,
        timeout_s: float = 120.0,
    ) -> PostgresCluster:
        """initdb a new cluster in `base_dir` (created if missing; one cluster per base_dir);
        not started.

        `fsync=True` (the default) is a real durable cluster: initdb syncs, the server fsyncs
        its WAL at every commit, full-page writes on. `fsync=False` turns fsync and
        full_page_writes off: fast; a committed transaction still survives kill() (it is in the
        page cache), but a machine crash or power cut could lose or corrupt anything.
        `settings`: more postgresql.conf lines (name -> value, quoted for you), applied last.
        `disk_bytes`: the cluster lives on a tmpfs of that size mounted under base_dir, to fill
        with fill_disk(); initdb's files take about 24 MB plus one WAL segment, so give it at
        least 48 MiB with the default 16 MB segments (`wal_segment_mb`, a power of two 1-1024).
        Raises PostgresNotInstalled (saying what to install), PermissionError when not root or
        when postgres cannot reach base_dir, RuntimeError with initdb's output if it fails."""
        if os.geteuid() != 0:
            raise PermissionError("devtools.postgres needs root: the server runs as `postgres`")
        bindir = find_bindir()
        user = ServerUser.lookup()
        base_dir = base_dir.resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        make_reachable(base_dir, user)
        cluster_dir = base_dir / ("disk" if disk_bytes else "pg")
        cluster_dir.mkdir()
        cluster = cls(
            base_dir,
            cluster_dir,
            port=port or free_port(),
            bindir=bindir,
            user=user,
            disk_bytes=disk_bytes,
        )
        try:
            if disk_bytes:
                cluster._mount(disk_bytes)
            else:
                os.chown(cluster_dir, user.uid, user.gid)
                cluster_dir.chmod(0o700)
            cluster._initdb(fsync=fsync, wal_segment_mb=wal_segment_mb, timeout_s=timeout_s)
            cluster._configure(max_connections, fsync, dict(settings or {}))
        except BaseException:
            cluster.close()
            raise
        return cluster

    # -- processes ---------------------------------------------------------------------------

    def _server_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.user.home,
            "USER": self.user.name,
            "LOGNAME": self.user.name,
            "LC_ALL": "C",
        }

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        """A child as the server user, in its own session, its output appended to the log."""
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cluster_dir,
                env=self._server_env(),
                user=self.user.uid,
                group=self.user.gid,
                extra_groups=self.user.groups,
                umask=0o077,
                start_new_session=True,
            )

    def _mount(self, size: int) -> None:
        opts = f"size={size},mode=0700,uid={self.user.uid},gid={self.user.gid}"
        _run_root(["mount", "-t", "tmpfs", "-o", opts, "edge-agent-pg", str(self.cluster_dir)])
        self._mounted = True

    def _initdb(self, *, fsync: bool, wal_segment_mb: int, timeout_s: float) -> None:
        args = [
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", PG_USER,
            "-E", "UTF8", "--locale=C", "--auth=trust", "--no-instructions",
            f"--wal-segsize={wal_segment_mb}", *([] if fsync else ["--no-sync"]),
        ]  # fmt: skip
        proc = self._spawn(args)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"initdb took over {timeout_s:.0f} s:\n{self.log_tail()}") from None
        if code != 0:
            raise RuntimeError(f"initdb exited with {code}:\n{self.log_tail()}")

    def _configure(self, max_connections: int, fsync: bool, settings: dict[str, str]) -> None:
        conf: dict[str, str] = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir or ""),
            "max_connections": str(max_connections),
            "logging_collector": "off",  # stderr, which is the log file
            "fsync": "on" if fsync else "off",
        }
        if not fsync:
            # synchronous_commit stays on: a commit is in the kernel's page cache when it returns,
            # so it survives kill(), as with fsync; only a machine crash can lose it.
            conf["full_page_writes"] = "off"
        conf |= settings
        lines = [f"{k} = '{v.replace(chr(39), chr(39) * 2)}'" for k, v in conf.items()]
        with open(self.data_dir / "postgresql.conf", "a") as f:
            f.write("\n# devtools/postgres.py\n" + "\n".join(lines) + "\n")
        # Trust on the socket (mode 0700: postgres and root only) and on 127.0.0.1; nothing else.
        (self.data_dir / "pg_hba.conf").write_text(
            "# devtools/postgres.py: trust on loopback only\n"
            "local all all trust\n"
            f"host all all {HOST}/32 trust\n"
        )

    @property
    def running(self) -> bool:
        """Whether the postmaster we started is alive (it may still be starting up)."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._popen.pid if self._popen is not None and self.running else None

    def _pidfile_status(self) -> str | None:
        """postmaster.pid's status line ("starting", "ready", ...) if the file is our process's."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except FileNotFoundError:
            return None
        if self._popen is None or len(lines) < 8 or lines[0].strip() != str(self._popen.pid):
            return None  # not yet written, or a stale file of a killed server
        return lines[7].strip()

    def start(self, timeout_s: float = 60.0) -> Self:
        """Start the server; returns once it accepts connections (after any crash recovery).

        Raises RuntimeError with the log's tail if the server exits, TimeoutError with it (after
        killing the server) if it is not ready within timeout_s; RuntimeError if running."""
        if self.running:
            raise RuntimeError(f"postgres is already running (pid {self.pid})")
        make_reachable(self.cluster_dir, self.user)  # pytest may have reset its tmp dir modes
        popen = self._popen = self._spawn([str(self.bindir / "postgres"), "-D", str(self.data_dir)])

        def ready() -> bool:
            if popen.poll() is not None:
                raise RuntimeError(
                    f"postgres exited with {popen.returncode} while starting:\n{self.log_tail()}"
                )
            return self._pidfile_status() == "ready"

        try:
            wait_for(ready, timeout_s=timeout_s, what=f"postgres on port {self.port}")
        except TimeoutError as e:
            self.kill()
            raise TimeoutError(f"{e}; the log ends:\n{self.log_tail()}") from None
        return self

    def stop(self, mode: StopMode = "fast", timeout_s: float = 60.0) -> int | None:
        """Shut down (pg_ctl's modes: smart, fast, immediate); returns the postmaster's exit code
        once it and every server process have exited, None if it was not running.

        Raises TimeoutError (the server left running) if that takes over timeout_s."""
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return None if popen is None else popen.returncode
        popen.send_signal(_STOP_SIGNALS[mode])
        try:
            code = popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"postgres did not stop ({mode}) within {timeout_s:.0f} s:\n{self.log_tail()}"
            ) from None
        wait_for(lambda: not _group_alive(popen.pid), timeout_s=timeout_s, what="server exit")
        return code

    def kill(self, timeout_s: float = 30.0) -> None:
        """A crash: SIGKILL to the postmaster and every server process at once (its process
        group); returns when all are gone. Nothing is flushed or checkpointed; what was
        committed is in the WAL (the page cache survives), and start() runs crash recovery."""
        popen = self._popen
        if popen is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        wait_for(lambda: not _group_alive(popen.pid), timeout_s=timeout_s, what="server killed")

    def restart(self, mode: StopMode = "fast", timeout_s: float = 60.0) -> Self:
        """stop(mode), then start(): the same port and data."""
        self.stop(mode, timeout_s)
        return self.start(timeout_s)

    # -- clients -----------------------------------------------------------------------------

    def dsn(self, database: str = "postgres") -> str:
        """postgresql://postgres@127.0.0.1:PORT/DATABASE (trust: no password)."""
        return f"postgresql://{PG_USER}@{HOST}:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres", timeout_s: float = 60.0) -> str:
        """Run `sql` with psql over TCP (one -c: statements in one string share a transaction
        unless they say otherwise); unaligned, tuples only, `|` between columns, without the last
        newline. Raises PsqlError with psql's stderr on any error."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        args = [
            str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
            "-h", HOST, "-p", str(self.port), "-U", PG_USER, "-d", database, "-c", sql,
        ]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout_s)
        if done.returncode != 0:
            raise PsqlError(f"psql exited with {done.returncode} on {sql!r}: {done.stderr.strip()}")
        return done.stdout.removesuffix("\n")

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (lower-case letters, digits, _); returns its DSN."""
        if not _DB_NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS, disconnecting whoever is still connected to it."""
        if not _DB_NAME.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- the disk ----------------------------------------------------------------------------

    @property
    def filler_path(self) -> Path:
        return self.cluster_dir / "filler"

    def disk_free(self) -> int:
        """Bytes free on the cluster's filesystem."""
        st = os.statvfs(self.cluster_dir)
        return st.f_bavail * st.f_frsize

    def fill_disk(self, leave_bytes: int = 0) -> int:
        """Fill the cluster's own disk (create(disk_bytes=...)) with a root-owned file, written
        until ENOSPC, then cut by `leave_bytes` (rounded by the filesystem to its pages). From
        then on, whatever the server must allocate (a new relation page, a WAL segment) fails
        with ENOSPC. Returns the filler's size; free_disk() deletes it."""
        if not self._mounted:
            raise RuntimeError("fill_disk() needs a disk of its own: create(..., disk_bytes=N)")
        fd = os.open(self.filler_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            block = bytes(1 << 20)
            size = len(block)
            while size:
                try:
                    os.write(fd, block[:size])
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    size //= 2
            filled = os.fstat(fd).st_size
            os.ftruncate(fd, max(0, filled - leave_bytes))
            return max(0, filled - leave_bytes)
        finally:
            os.close(fd)

    def free_disk(self) -> None:
        """Delete fill_disk()'s file: the space is back at once."""
        self.filler_path.unlink(missing_ok=True)

    # -- the end -----------------------------------------------------------------------------

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def close(self) -> None:
        """Stop (fast; SIGKILL if that takes over 30 s), unmount its disk, remove the cluster
        directory. The log stays. Safe to call twice."""
        if self.running:
            try:
                self.stop("fast", timeout_s=30)
            except TimeoutError:
                self.kill()
        if self._mounted:
            _run_root(["umount", str(self.cluster_dir)])
            self._mounted = False
        shutil.rmtree(self.cluster_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        """Starts the cluster unless it runs; if that fails, closes it and raises."""
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _run_root(args: list[str]) -> None:
    """A command of ours (mount, umount); RuntimeError with its stderr if it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: {done.stderr.strip()}")
