"""What a reload may change live (agent/config/reload.py)."""

from __future__ import annotations

from agent.config.reload import plan
from agent.config.settings import BufferSettings, ForwardSettings, LogSettings, Settings


def test_the_way_to_the_cloud_and_the_log_are_live_the_rest_needs_a_restart() -> None:
    old = Settings(gateway_id="gw")
    new = Settings(
        gateway_id="gw",
        forward=ForwardSettings.model_validate(
            {"url": "http://127.0.0.1:1/ingest", "token": "t", "timeout_s": 11}
        ),
        log=LogSettings.model_validate({"level": "debug"}),
        buffer=BufferSettings.model_validate({"path": "/tmp/elsewhere.sqlite3"}),
    )
    live, restart = plan(old, new)
    assert live == ["forward.timeout_s", "forward.token", "forward.url", "log.level"]
    assert restart == ["buffer.path"]


def test_gzip_needs_a_restart_it_changes_a_cut_batchs_bytes() -> None:
    live, restart = plan(
        Settings(gateway_id="gw"), Settings(gateway_id="gw", forward=ForwardSettings(gzip=False))
    )
    assert live == [] and restart == ["forward.gzip"]
