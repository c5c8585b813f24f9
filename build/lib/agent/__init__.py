"""edge-agent: camera metadata from the site broker to the cloud, exactly once."""

__version__ = "0.1.0"
