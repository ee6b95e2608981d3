"""bench/scale.py (issue 28, item 5) in its quick mode, and bench/sizing.py against infra/README.md.

The quick mode runs the real prepare and fit stages (Ray, two subset-family sizes, a CIFAR-shaped store
cut to 5,000 + 1,000 points) and the forget rows; here: the JSON and the table have their shape, and the
counts are positive and sane (the fit tasks read at least the masks they hold and write at least their
block of theta; every stage's reads are requests that happened).
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

QUICK_POINTS = (5_000, 1_000)


def test_scale_quick_json_and_table(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, "bench/scale.py", "--quick", "--work", str(tmp_path / "work"),
                           "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert [c["m"] for c in cases] == [100, 200]
    n_train, n_val = QUICK_POINTS
    for case in cases:
        tasks = case["fit"]["tasks"]
        assert len(tasks) == case["blocks"] == 1
        for task in tasks:
            assert task["wall_s"] > 0 and task["peak_rss"] > 50e6
            io = task["io"]
            # the task reads every fit model's mask (bool, zstd: at least a few bits each) and writes its
            # block of theta (n_train x block targets float32, compressible only where planted zeros are)
            assert io["n"]["get"] > 0 and io["bytes"]["get"] > case["m"] * n_train / 64
            assert io["n"]["put"] > 0 and io["bytes"]["put"] > 0
        driver = case["fit"]["driver"]
        assert driver["wall_s"] >= max(t["wall_s"] for t in tasks) and driver["peak_rss"] > 50e6
    rows = cases[-1]["forget_rows"]  # m-independent: measured at the largest m
    copy = cases[-1]["rows_copy"]  # by the driver, or by Ray tasks (their records)
    assert cases[0]["forget_rows"] is None
    assert copy["io"]["n"]["put"] + sum(t["io"]["n"]["put"] for t in copy.get("tasks", [])) > 0
    for part in ("configured", "late"):
        assert rows[part]["io"]["n"]["get"] + rows[part]["io"]["n"]["miss"] > 0
        assert rows[part]["rows"] > 0
    names = {r["metric"] for r in result["rows"]}
    assert {"fit.task.peak_rss_gb", "fit.task.read_gb", "fit.stage.read_req", "rows.late.read_over_own"} <= names
    for row in result["rows"]:
        assert set(row["line"]) == {"20000", "40000", "300000"}
        assert set(row["measured"]) <= {"100", "200"} and row["measured"]
    assert "| backend | estimator | metric |" in proc.stdout and "line m=300000" in proc.stdout


def test_infra_readme_sizing_is_the_scripts():
    """infra/README.md's sizing tables are bench/sizing.py's output, verbatim."""
    sys.path.insert(0, str(REPO))
    from bench.sizing import sizing_markdown

    readme = (REPO / "infra" / "README.md").read_text()
    assert sizing_markdown() in readme
