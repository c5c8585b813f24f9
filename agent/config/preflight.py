"""Checks of a config against the machine it will run on (not its syntax: config.py does that).

`check-config` runs them; `run` refuses the example gateway id, an outbox path that is a
directory, TLS files the TLS library cannot load, a password file that is not UTF-8 and a
password file without a user name too (exit 2, one line each, rather than a traceback when they
are first used, or a session that never authenticates). Each problem is one line naming the
key, the value and why.
"""

from __future__ import annotations

import grp
import os
import pwd
import ssl
import stat
from collections.abc import Callable
from pathlib import Path

from agent.config.settings import Settings, read_secret, secret_path

# The value shipped in config.example.toml. Two gateways with the same id collide silently in
# the cloud's (gateway, seq) dedup, so the unedited example must not pass.
EXAMPLE_GATEWAY_ID = "site-42-gw-1"
# The user the systemd unit runs the agent as (systemd/edge-agent.service, User=).
SERVICE_USER = "edge-agent"


def gateway_id_problem(settings: Settings) -> str | None:
    if settings.gateway_id == EXAMPLE_GATEWAY_ID:
        return (
            f"gateway_id = {EXAMPLE_GATEWAY_ID!r}: the example's value; set this gateway's own "
            "id (the cloud deduplicates by (gateway, seq): two gateways with one id lose each "
            "other's data)"
        )
    return None


def default_service_user() -> str:
    """The service user when it exists on this machine, else whoever runs the check."""
    try:
        pwd.getpwnam(SERVICE_USER)
        return SERVICE_USER
    except KeyError:
        return pwd.getpwuid(os.geteuid()).pw_name


def buffer_path_problem(settings: Settings) -> str | None:
    """The outbox path must name a file, not a directory ('', '.', '/var/lib/edge-agent'), and
    a name the file system takes (at most 255 bytes). `run` checks this too: it could not open
    a directory as its outbox (exit 3)."""
    path = settings.buffer.path
    key = f"buffer.path = {str(path)!r}"
    try:
        st = path.stat()
    except (FileNotFoundError, PermissionError):
        return None  # created by `run`; a directory the user may not enter: buffer_problem
    except OSError as e:  # ENAMETOOLONG, ELOOP, ...
        return f"{key}: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return (
            f"{key}: is a directory; name the outbox file in it, e.g. "
            f"{str(path / 'buffer.sqlite3')!r}"
        )
    return None


def buffer_problem(settings: Settings, user: str) -> str | None:
    """The outbox's directory must exist and `user` must be able to create files in it; the
    path must name a file (buffer_path_problem)."""
    problem = buffer_path_problem(settings)
    if problem is not None:
        return problem
    d = settings.buffer.path.parent
    key = f"buffer.path = {str(settings.buffer.path)!r}"
    try:
        st = d.stat()
    except FileNotFoundError:
        return f"{key}: the directory {str(d)!r} does not exist (create it, owned by {user})"
    except OSError as e:
        return f"{key}: the directory {str(d)!r} cannot be examined: {e.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{key}: {str(d)!r} is not a directory"
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return f"{key}: no user {user!r} on this machine to check the directory for"
    if not _writable_by(d, st, pw):
        owner, group = _owner(st.st_uid), _group(st.st_gid)
        return (
            f"{key}: the directory {str(d)!r} is not writable by user {user!r} "
            f"(owner {owner}, group {group}, mode {stat.S_IMODE(st.st_mode):04o})"
        )
    existing = settings.buffer.path
    try:
        existing_st = existing.stat()
    except FileNotFoundError:
        return None
    except PermissionError as e:
        if os.geteuid() != pw.pw_uid:
            # The directory's mode lets `user` in (checked above); this user may not enter it.
            return None
        return f"{key}: the directory {str(d)!r} cannot be searched: {e.strerror}"
    except OSError as e:
        return f"{key}: {e.strerror}"
    if not _writable_by(existing, existing_st, pw):
        return f"{key}: the outbox file exists and is not writable by user {user!r}"
    return None


def _writable_by(path: Path, st: os.stat_result, pw: pwd.struct_passwd) -> bool:
    """Whether that user may write (and, for a directory, enter) `path`: the mode bits of the
    owner, a group of the user, or others (ACLs are not considered)."""
    if pw.pw_uid == 0:
        return True
    need = 0o3 if stat.S_ISDIR(st.st_mode) else 0o2
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == pw.pw_uid:
        return (mode >> 6) & need == need
    groups = {pw.pw_gid} | {g.gr_gid for g in grp.getgrall() if pw.pw_name in g.gr_mem}
    if st.st_gid in groups:
        return (mode >> 3) & need == need
    return mode & need == need


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def tls_problems(settings: Settings, *, as_service: bool = True) -> list[str]:
    """The CA file and client certificate and key of each TLS connection the agent will make,
    loaded as it will load them (agent/config/credentials.py): a file that is no PEM certificate
    passes `is_file` and raised ssl.SSLError at start. `as_service=False` (check-config, run by
    whoever): a file this user may not read is not a problem, the service user may."""
    problems = []
    m, f = settings.mqtt, settings.forward
    # The broker: TLS as agent/intake/ingest.py's tls_context decides it; the cloud: an https URL.
    if m.tls or m.ca_file is not None or m.cert_file is not None:
        problems += _tls_file_problems("mqtt", m.ca_file, m.cert_file, m.key_file, as_service)
    if f.url.startswith("https://"):
        problems += _tls_file_problems("forward", f.ca_file, f.cert_file, f.key_file, as_service)
    return problems


def _tls_file_problems(
    section: str,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    as_service: bool,
) -> list[str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file is not None:
        problems = _load_problems(
            f"{section}.ca_file = {str(ca_file)!r}",
            "not a PEM certificate",
            lambda: ctx.load_verify_locations(cafile=str(ca_file)),
            as_service,
        )
        if problems:
            return problems
    if cert_file is None or key_file is None:
        return []
    return _load_problems(
        f"{section}.cert_file = {str(cert_file)!r}, {section}.key_file = {str(key_file)!r}",
        "not a PEM certificate and its private key",
        lambda: ctx.load_cert_chain(str(cert_file), str(key_file)),
        as_service,
    )


def _load_problems(
    keys: str, not_pem: str, load: Callable[[], object], as_service: bool
) -> list[str]:
    """What `load` (reading TLS files into a context) says is wrong with the files at `keys`."""
    try:
        load()
    except ssl.SSLError as e:
        return [f"{keys}: {not_pem} ({_why(e)})"]
    except PermissionError as e:
        return [f"{keys}: {e.strerror}"] if as_service else []
    except OSError as e:
        return [f"{keys}: cannot be read: {e.strerror}"]
    return []


def _why(e: ssl.SSLError) -> str:
    """'no certificate or crl found' from '[X509: NO_CERTIFICATE_OR_CRL_FOUND] ...'."""
    return str(e.reason or e.library or "unreadable").replace("_", " ").lower()


def username_problem(settings: Settings) -> str | None:
    """A password file without a user name: aiomqtt sends a password only with a user name, so
    it was silently never sent. (An inline password is refused by the model; a file is checked
    here, once load_settings found it, so that a missing file is said first.)"""
    m = settings.mqtt
    if m.password_file is not None and m.username is None:
        return (
            "mqtt: mqtt.password_file needs mqtt.username: MQTT sends a password only with a "
            "user name"
        )
    return None


def credential_warnings(settings: Settings) -> list[str]:
    """The systemd credential mqtt-password holds a password but no user name is configured:
    not an error (the .deb loads an empty credential for every install), but never sent."""
    m = settings.mqtt
    if m.username is not None or m.password is not None or m.password_file is not None:
        return []
    path = secret_path(None, "mqtt-password")
    if path is None:
        return []
    try:
        password = read_secret(None, path)
    except (OSError, UnicodeDecodeError):
        return []  # secret_problems says what is wrong with it
    if not password:
        return []
    return [
        f"the systemd credential mqtt-password ({str(path)!r}) holds a password but "
        "mqtt.username is not set: MQTT sends a password only with a user name, so it is not "
        "sent; set mqtt.username, or empty the credential"
    ]


def secret_problems(settings: Settings, *, as_service: bool = True) -> list[str]:
    """The broker password's file (or systemd credential) must read as UTF-8 text: the MQTT
    session read it at connect and died of a UnicodeDecodeError. (The cloud token file is read
    and re-read at run time, a bad one reported in /status: it is not refused here.)
    `as_service=False`: a file this user may not read is not a problem (see tls_problems)."""
    m = settings.mqtt
    if m.password is not None:
        return []
    path = secret_path(m.password_file, "mqtt-password")
    if path is None:
        return []
    key = (
        f"mqtt.password_file = {str(path)!r}"
        if m.password_file is not None
        else f"the systemd credential mqtt-password ({str(path)!r})"
    )
    try:
        read_secret(None, path)
    except UnicodeDecodeError:
        return [f"{key}: not UTF-8 text"]
    except PermissionError as e:
        return [f"{key}: {e.strerror}"] if as_service else []
    except OSError as e:
        return [f"{key}: cannot be read: {e.strerror}"]
    return []
