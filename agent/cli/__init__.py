"""The commands (edge-agent ...): exceptions become exit codes here only."""

from agent.cli.main import main

__all__ = ["main"]
