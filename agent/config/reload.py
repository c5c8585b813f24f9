"""What a reload (SIGHUP, `systemctl reload edge-agent`) may change in a running agent.

Pure: the running settings and the file's, in; the keys that changed, sorted into those applied
live and those that need a restart. A reload is all or nothing: one key that needs a restart
refuses the whole reload (naming the keys), and the running config stays.
"""

from __future__ import annotations

from typing import Any

from agent.config.settings import Settings

# Applied live: the log, and everything about the way to the cloud (url, token, TLS files,
# timeouts, backoff, probing, pacing, batch sizes, the alert threshold). Everything else is the
# shape of the data or of the state on disk (topics, streams, windows, the outbox, the broker
# session, the health listener): a restart.
LIVE_SECTIONS = ("log", "forward")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def changed_keys(old: Settings, new: Settings) -> list[str]:
    """The dotted keys whose values differ (a list of tables, `streams`, is one key)."""
    a = _flat(old.model_dump(mode="json"))
    b = _flat(new.model_dump(mode="json"))
    # Secrets compare by value: model_dump(mode="json") masks SecretStr.
    a["forward.token"] = old.forward.token.get_secret_value() if old.forward.token else None
    b["forward.token"] = new.forward.token.get_secret_value() if new.forward.token else None
    a["mqtt.password"] = old.mqtt.password.get_secret_value() if old.mqtt.password else None
    b["mqtt.password"] = new.mqtt.password.get_secret_value() if new.mqtt.password else None
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


# Within those, a restart: gzip changes the bytes of a batch already cut (G7: the same bytes on
# every attempt).
NOT_LIVE = ("forward.gzip",)


def plan(old: Settings, new: Settings) -> tuple[list[str], list[str]]:
    """(keys applied live, keys that need a restart)."""
    keys = changed_keys(old, new)
    live = [k for k in keys if k.split(".", 1)[0] in LIVE_SECTIONS and k not in NOT_LIVE]
    return live, [k for k in keys if k not in live]
