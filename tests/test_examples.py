"""examples/first_hour.py and its notebook run as written on a finished store (issue 30, item 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO, TINY

EXAMPLES = REPO / "examples"


def test_first_hour_script_draws_both_figures(tiny_finished, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "first_hour.py"), str(TINY), "--set",
                           f"store={tiny_finished['root']}", "--out", str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("figure1.png", "top_k.png"):
        assert (out / name).stat().st_size > 10_000


def test_first_hour_notebook_cells_run_in_order(tiny_finished, tmp_path, monkeypatch):
    notebook = json.loads((EXAMPLES / "first_hour.ipynb").read_text())
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    cells[0] = f"CONFIG = {str(TINY)!r}\nOVERRIDES = [{'store=' + str(tiny_finished['root'])!r}]\nOUT = {str(tmp_path)!r}"
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    namespace: dict = {}
    for source in cells:
        exec(compile(source, "first_hour.ipynb", "exec"), namespace)  # noqa: S102 - our own notebook
    assert namespace["figure"].stat().st_size > 10_000 and namespace["panel"].stat().st_size > 10_000
    assert len(namespace["top"]["positive"]) == 5
