"""The operating surface: /status, /readyz, /metrics, logs, sd_notify."""
