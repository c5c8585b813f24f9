"""The running parts of an agent, as the operating surface reads them (/status, /readyz,
/metrics, the figures). Built by agent/app/service.py; defined here, below it, so the surface
needs nothing from the wiring."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.settings import Settings
from agent.core.stats import Stats
from agent.durable.checkpoint import Checkpointer
from agent.durable.outbox import Outbox
from agent.forward.forwarder import Forwarder
from agent.intake.acks import AckLedger
from agent.intake.ingest import Intake, MqttSession
from agent.intake.timekeeping import CameraClocks
from agent.windows.aggregate import Aggregator


@dataclass
class Pipeline:
    """The running parts, exposed for the health endpoint and tests."""

    settings: Settings
    outbox: Outbox
    aggregator: Aggregator
    ledger: AckLedger
    intake: Intake
    clocks: CameraClocks
    session: MqttSession
    forwarder: Forwarder
    stats: Stats
    checkpointer: Checkpointer
