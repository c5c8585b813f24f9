"""python -m agent.cli: the edge-agent command."""

import sys

from agent.cli.main import main

sys.exit(main(sys.argv[1:]))
