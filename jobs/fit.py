"""Ray job entrypoint: `ray job submit --address $RAY_ADDRESS -- python jobs/fit.py CONFIG [--set k=v ...]`.

Joins the cluster through RAY_ADDRESS (set by `ray job submit`), prints progress to the job log and
exits non-zero with the error on failure. Re-submitting resumes: finished work is skipped.
"""

import sys

from pipeline.cli import app

if __name__ == "__main__":
    app(["fit", *sys.argv[1:]])
