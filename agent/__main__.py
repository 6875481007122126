"""`python -m agent` runs the agent (same as `optout run`)."""

import sys

from agent.cli import main

sys.exit(main(["run", *sys.argv[1:]]))
