"""The conventions people expect of a command line: --version, help without typer's `{config}` / `<str>`
artefacts, whole tables and lines when stdout is a pipe or a file, a closed pipe ending quietly,
--json where a table is printed, and self-influence labelled as what it lists."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from helpers import CLI, TINY

ENV = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # as a log or `| tee` sees it


def _cli(*args, **kwargs):
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=ENV, **kwargs)


def test_version():
    from importlib import metadata

    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"oracle-farm {metadata.version('oracle-farm')}"


def _commands(app, prefix=()):
    import typer.main

    group = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + (name,))

    walk(group, tuple(prefix))
    return out


def test_help_has_no_typer_artefacts():
    from typer.testing import CliRunner

    from pipeline.cli import app

    runner = CliRunner()
    paths = _commands(app)
    assert ("export",) in paths and ("query", "predict") in paths
    for path in paths:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        for artefact in ("{config}", "{CONFIG}", "<str>", "<bool>", "<int>", "<list[str]>"):
            assert artefact not in result.output, (path, artefact, result.output)
        if path and path[-1] not in ("query", "ls", "gc") and path != ("query",):
            assert "CONFIG" in result.output, (path, result.output)


def test_tables_and_lines_are_whole_outside_a_terminal(tmp_path):
    deep = tmp_path / ("a-folder-with-a-long-name-" * 4) / "store"
    for args in (("config", str(TINY), "--set", f"store={deep}"),):
        proc = _cli(*args)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert any(str(deep) in line and "prepare-" in line for line in lines), proc.stdout
        assert "\x1b" not in proc.stdout and "…" not in proc.stdout
    proc = _cli("config", str(TINY), "--set", f"store={deep}", "--json")
    data = json.loads(proc.stdout)
    assert data["config"]["store"] == str(deep) and all(str(deep) in s["path"] for s in data["stages"])
    proc = _cli("config", str(TINY), "--set", "unlearn.methods={nosuch: {}}")  # a message of some 250 characters
    line = next(line for line in proc.stderr.splitlines() if "unknown method 'nosuch'" in line)
    assert proc.returncode == 2 and line.endswith("or a plugin's `module:attr`"), proc.stderr  # whole, not wrapped


@pytest.mark.parametrize("json_out", [False, True])
def test_a_closed_pipe_ends_quietly(json_out, tmp_path):
    """The reader went away (`| head`) before a line was written: no traceback, no `failed:`."""
    proc = subprocess.Popen([CLI, "config", str(TINY), "--set", f"store={tmp_path}", *(["--json"] if json_out else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert stderr == "", stderr


def test_self_influence_lists_highest_and_lowest_and_counts_ties():
    from pipeline.stages.query import Point, ranked_ends

    def make(i, v):
        return Point(int(i), float(v), None, "train")

    values = np.array([0.0, 0.5, 0.0, -0.2, 0.0, 0.9, 0.0, 0.0], dtype=np.float32)
    ends, notes = ranked_ends(values, 3, make)
    assert [p.index for p in ends["highest"]] == [5, 1]  # the third would be one of five zeros
    assert [p.index for p in ends["lowest"]] == [3]
    assert notes == ["highest: 5 points have exactly +0, not listed", "lowest: 5 points have exactly +0, not listed"]
    ends, notes = ranked_ends(values, 2, make)
    assert [p.index for p in ends["highest"]] == [5, 1] and [p.index for p in ends["lowest"]] == [3] and len(notes) == 1


def test_self_influence_on_a_finished_store(tiny_finished):
    from pipeline.stages.query import open_attribution, ranked_ends

    overrides = [f"store={tiny_finished['root']}"]
    proc = _cli("query", "self-influence", str(TINY), "--set", overrides[0], "--k", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    am = open_attribution(str(TINY), overrides)
    ends, notes = ranked_ends(am.self_influence(), 5, am._point)
    assert json.loads(proc.stdout) == {**{d: [p.as_dict() for p in pts] for d, pts in ends.items()}, "notes": notes}
    table = _cli("query", "self-influence", str(TINY), "--set", overrides[0], "--k", "5")
    assert "highest" in table.stdout and "lowest" in table.stdout and "positive" not in table.stdout


def test_the_query_docstring_runs_as_written(tiny_finished, monkeypatch):
    import doctest

    from helpers import REPO

    from pipeline.stages import query

    monkeypatch.chdir(REPO)  # the examples name configs/tiny.yaml as a user in the repository would
    result = doctest.testmod(query, extraglobs={"store": str(tiny_finished["root"])}, report=True,
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 9 and result.failed == 0, result


def test_query_predict_shows_the_oracles_margins(tiny_finished):
    from pipeline.stages.query import open_attribution

    overrides = [f"store={tiny_finished['root']}"]
    proc = _cli("query", "predict", str(TINY), "--forget-set", "random10", "--set", overrides[0], "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    am = open_attribution(str(TINY), overrides)
    oracles = am.oracle_margins("random10")
    forget = am.plan.forget_sets["random10"]
    assert got["oracles"] == len(oracles) == am.plan.cfg.train.oracle.eval
    assert [p["index"] for p in got["points"]] == forget.tolist()
    np.testing.assert_allclose([p["oracle_margin_mean"] for p in got["points"]], oracles[:, forget].mean(0), rtol=1e-6)
    np.testing.assert_array_equal([p["full_margin"] for p in got["points"]], am.full_margins(0)[forget])
    table = _cli("query", "predict", str(TINY), "--forget-set", "random10", "--set", overrides[0])
    assert "oracle mean" in table.stdout and "predicted margin" in table.stdout


def test_a_query_on_a_missing_store_says_where_it_looked(tmp_path):
    proc = _cli("query", "top-k", str(TINY), "--target", "1", "--set", "store=./nowhere", cwd=tmp_path)
    assert proc.returncode == 2
    text = " ".join(proc.stderr.split())
    assert f"{tmp_path / 'nowhere'} (the config's `store: ./nowhere`, relative to the working directory {tmp_path})" in text
    assert "holds no store" in text and not (tmp_path / "nowhere").exists()
