"""The agent issue's benchmark (cold syncs, one-endpoint changes, RSS); prints JSON.

Kept as the name the agent issue and the README cite: the code lives in
``sync_scale.py`` (issue #9's sync_scale), which measures the same things
through the agent with the real proxiers. Usage (root):

    .venv/bin/python benchmarks/agent_sync.py [--sizes 1000,10000] [--ipvs-sizes 1000,10000]
"""

from __future__ import annotations

import sys

from benchmarks.sync_scale import main

if __name__ == "__main__":
    sys.exit(main(describe=lambda: __doc__.splitlines()[0]))
