"""The configuration: one pydantic-settings model, credentials, the config against the
machine."""
