"""The README's results table cannot drift (issue 29, item 8): it is exactly what
`scripts/readme_table.py` prints for the committed figures file, a real digits run's report.json."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "readme_table.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("readme_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_is_the_scripts_output_for_the_committed_figures(script):
    figures = json.loads((ROOT / script.FIGURES).read_text())
    readme = (ROOT / "README.md").read_text()
    assert script.block_of(readme) == script.table(figures), (
        "README.md's results table differs from the figures file's: run "
        f"`python scripts/readme_table.py {script.FIGURES} --write README.md`")


def test_the_figures_file_is_a_stamped_digits_run_with_every_row(script):
    figures = json.loads((ROOT / script.FIGURES).read_text())
    assert figures["config"] == "digits"
    assert set(figures["stamp"]) == {"date", "commit", "machine"} and figures["stamp"]["commit"] != "unknown"
    sets = {r["forget_set"] for r in figures["rows"]}
    assert sets == {"random10", "random50", "class3-40", "atypical50"}
    for fs in sets:
        methods = {r["method"] for r in figures["rows"] if r["forget_set"] == fs}
        assert {"retrain", "do_nothing", "dm_direct", "dmm", "oracle_matching", "del", "sfron", "camu"} <= methods


def test_the_script_rewrites_only_the_block_and_refuses_a_readme_without_markers(script, tmp_path):
    figures = ROOT / script.FIGURES
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{script.BEGIN}\nold table\n{script.END}\nafter\n")
    done = subprocess.run([sys.executable, str(SCRIPT), str(figures), "--write", str(readme)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith(f"before\n{script.BEGIN}\n") and text.endswith(f"{script.END}\nafter\n")
    assert script.block_of(text) == script.table(json.loads(figures.read_text()))
    readme.write_text("no markers\n")
    done = subprocess.run([sys.executable, str(SCRIPT), str(figures), "--write", str(readme)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "markers" in done.stderr
    assert readme.read_text() == "no markers\n"


def test_a_report_and_its_figures_subset_give_the_same_table(script, tiny_finished, tmp_path):
    report = tiny_finished["out"] / "report.json"
    subset = tmp_path / "figures.json"
    done = subprocess.run([sys.executable, str(SCRIPT), str(report), "--figures", str(subset)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    full = json.loads(report.read_text())
    assert done.stdout == script.table(full) == script.table(json.loads(subset.read_text()))
    assert "| finetune |" in done.stdout and full["stamp"]["date"] in done.stdout
