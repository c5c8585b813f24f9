"""`check-config --connect`: try the broker and the cloud with the config's settings and say
which one failed and why.

The broker probe connects with its own client id and a clean session that expires at once
(never the agent's id: that would take over, or end, the running agent's session), checks the
CONNACK, subscribes to the configured topics at QoS 1 and checks the SUBACK. The cloud probe
posts an empty batch (nothing to store) over the configured TLS with the configured token: an
answer other than 401/403, a redirect or a 404/405 means the URL, TLS and credentials are good.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from dataclasses import dataclass

import aiomqtt
import httpx
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import __version__
from agent.config.credentials import client_tls_context
from agent.config.settings import (
    Settings,
    credential_hint,
    mask_url,
    read_secret,
    secret_path,
    token_problem,
)
from agent.core.text import one_line
from agent.intake.ingest import TopicRouter, connect_refusal, suback_problems, tls_context


@dataclass(frozen=True)
class ProbeResult:
    target: str
    ok: bool
    detail: str


def probe_all(settings: Settings, *, timeout_s: float) -> list[ProbeResult]:
    """Both probes; neither stops the other."""
    return [
        asyncio.run(probe_broker(settings, timeout_s=timeout_s)),
        probe_cloud(settings, timeout_s=timeout_s),
    ]


async def probe_broker(settings: Settings, *, timeout_s: float) -> ProbeResult:
    s = settings.mqtt
    target = f"broker {s.host}:{s.port}"
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    topics = TopicRouter(settings.streams).subscriptions
    try:
        password = read_secret(s.password, s.password_file, "mqtt-password")
        client = aiomqtt.Client(
            s.host,
            s.port,
            identifier=f"{s.client_id}-check-{os.getpid()}",
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=True,
            properties=props,
            username=s.username,
            password=password,
            tls_context=tls_context(s),
            timeout=timeout_s,
        )
        async with asyncio.timeout(timeout_s + 1), client:
            granted = await client.subscribe(
                [(t, SubscribeOptions(qos=1, retainHandling=2)) for t in topics],
                timeout=timeout_s,
            )
    except aiomqtt.MqttError as e:
        refusal = connect_refusal(e)
        if refusal:
            return ProbeResult(target, False, f"CONNACK: {refusal}")
        return ProbeResult(target, False, f"cannot connect: {e}")
    except TimeoutError:
        return ProbeResult(target, False, f"no CONNACK/SUBACK within {timeout_s:g} s")
    except (OSError, ssl.SSLError) as e:
        return ProbeResult(target, False, f"cannot connect: {e}")
    problems = suback_problems(topics, granted)
    if problems:
        return ProbeResult(target, False, "CONNACK ok; SUBACK: " + "; ".join(problems))
    return ProbeResult(target, True, f"CONNACK ok, SUBACK granted QoS 1 for {', '.join(topics)}")


def probe_cloud(settings: Settings, *, timeout_s: float) -> ProbeResult:
    f = settings.forward
    target = f"cloud {mask_url(f.url)}"
    verify: ssl.SSLContext | bool = True
    headers = {
        "Content-Type": "application/json",
        "User-Agent": f"edge-agent/{__version__} check-config",
        "Idempotency-Key": f"{settings.gateway_id}:probe",
    }
    try:
        if f.url.startswith("https://"):
            verify = client_tls_context(
                ca_file=f.ca_file, cert_file=f.cert_file, key_file=f.key_file
            )
    except (OSError, ssl.SSLError) as e:
        return ProbeResult(target, False, f"cannot set up TLS: {e}")
    # Read as `run` reads it: forward.token, forward.token_file, else the credential.
    source = None if f.token is not None else secret_path(f.token_file, "cloud-token")
    try:
        token = read_secret(f.token, source)
    except OSError as e:
        return ProbeResult(target, False, f"cannot read the cloud token '{source}': {e.strerror}")
    except UnicodeDecodeError:
        return ProbeResult(target, False, f"the cloud token file '{source}' is not UTF-8 text")
    where = "forward.token" if f.token is not None else f"'{source}'"
    if token:
        # As the agent's TokenSource would refuse it (httpx raised on a non-ASCII header).
        why = token_problem(token)
        if why is not None:
            return ProbeResult(target, False, f"the cloud token {why}")
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps(
        {
            "schema": "edge-agent/v1",
            "gateway": settings.gateway_id,
            "first_seq": 0,
            "last_seq": -1,
            "sent_at": "1970-01-01T00:00:00.000Z",
            "chunks": [],
        }
    )
    try:
        with httpx.Client(verify=verify, timeout=timeout_s, follow_redirects=False) as client:
            r = client.post(f.url, content=body, headers=headers)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        return ProbeResult(target, False, f"{type(e).__name__}: {e}")
    status, answer = r.status_code, one_line(r.text[:300])
    scheme = "TLS verified" if f.url.startswith("https://") else "plain HTTP"
    if status in (401, 403):
        if token:
            why = f"check the token in {where}"
        elif source is not None:
            why = f"no token: {where} is empty; put the cloud's token there"
        else:
            why = "no token configured: " + credential_hint("cloud-token", "forward.token_file")
        return ProbeResult(target, False, f"HTTP {status}: credentials refused ({why}): {answer}")
    if 300 <= status < 400:
        return ProbeResult(target, False, f"HTTP {status}: a redirect (never followed)")
    if status in (404, 405):
        return ProbeResult(target, False, f"HTTP {status}: check forward.url: {answer}")
    if status == 429 or status >= 500:
        return ProbeResult(target, False, f"HTTP {status}: the cloud is failing: {answer}")
    sent = f"; token from {where}" if token else ""
    return ProbeResult(
        target,
        True,
        f"{scheme}, credentials accepted (HTTP {status} to an empty probe batch{sent})",
    )
