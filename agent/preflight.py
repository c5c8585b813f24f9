"""Checks of a config against the machine it will run on (not its syntax: config.py does that).

`check-config` runs them; `run` refuses the example gateway id too. Each problem is one line
naming the key, the value and why.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from agent.config import Settings

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


def buffer_problem(settings: Settings, user: str) -> str | None:
    """The outbox's directory must exist and `user` must be able to create files in it."""
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
    if existing.exists() and not _writable_by(existing, existing.stat(), pw):
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
