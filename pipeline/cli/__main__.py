"""`python -m pipeline.cli`: the `oracle-farm` command line."""

import sys

from pipeline.cli import app

sys.exit(app())
