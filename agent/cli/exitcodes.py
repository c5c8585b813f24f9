"""Every exit code of `edge-agent`, one meaning each, in one table: the CLI returns these, its
help epilog and docs/reference.md's table are written from (and tested against) this list."""

from __future__ import annotations

import textwrap
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    NOT_READY = 1
    CONFIG = 2
    STARTUP = 3
    CONNECT = 4
    UNREACHABLE = 5
    NOT_FOUND = 6
    SECOND_SIGNAL = 7
    PUBLISH_FAILED = 8
    INTERRUPTED = 130
    BROKEN_PIPE = 141


MEANING: dict[Exit, str] = {
    Exit.OK: "done; `status`, `top --once`: the agent is ready",
    Exit.NOT_READY: "`status`, `top --once`: the agent answered, not ready (problems printed)",
    Exit.CONFIG: "bad configuration or usage: one line per problem names the key or option",
    Exit.STARTUP: "could not start: the outbox unopenable or held by a running agent, no outbox "
    "(`deadletter`), the broker unreachable (`tap`)",
    Exit.CONNECT: "`check-config --connect`: the config is fine, the broker or the cloud is not",
    Exit.UNREACHABLE: "`status`, `top`, `tap --sent`: no answer from the agent's health "
    "endpoint; `forward --now`: no agent runs on the configured outbox",
    Exit.NOT_FOUND: "`deadletter show` / `retry`: a SEQ that is not a dead letter",
    Exit.SECOND_SIGNAL: "`run`: a second SIGTERM/SIGINT cut the shutdown short (the outbox and "
    "the broker's session keep the data)",
    Exit.PUBLISH_FAILED: "`simulate cameras`: some publishes got no PUBACK (the summary counts "
    "them)",
    Exit.INTERRUPTED: "`run`: stopped by Ctrl-C before the shutdown took over (128 + SIGINT)",
    Exit.BROKEN_PIPE: "the reader of stdout went away (128 + SIGPIPE), e.g. piped into `head`",
}


def epilog() -> str:
    """The exit codes for `edge-agent --help`."""
    lines = ["exit codes:"]
    for code in Exit:
        text = MEANING[code].replace("`", "")
        first = f"  {int(code):>3}  "
        lines += textwrap.wrap(text, 88, initial_indent=first, subsequent_indent=" " * len(first))
    return "\n".join(lines)
