"""The `oracle-farm` console script as users run it: exit code 0 on success, 2 on bad input with a
message and no traceback, and the store left alone by commands that only read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, TINY, cli, copy_store, store_snapshot, tiny_plan


def assert_bad_input(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in " ".join(result.stderr.split()), result.stderr  # rich may wrap long lines


def test_help_lists_the_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("config", "prepare", "status", "train"):
        assert command in result.stdout


# ------------------------------------------------------------------------------------------ config
@pytest.fixture(scope="module")
def config_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("config") / "store"
    return store, cli("config", str(TINY), "--set", f"store={store}", "--set", "train.epochs=5")


def test_config_prints_the_resolved_config_and_every_stage_id(config_run):
    store, result = config_run
    assert result.returncode == 0, result.stderr
    assert "epochs: 5" in result.stdout and "momentum: 0.9" in result.stdout  # defaults are shown
    for label, ref in tiny_plan(store, "train.epochs=5").all_stage_refs():
        assert ref.id in result.stdout, label
    assert not store.exists()  # printing a config touches no store


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "train.epocs=3"], ["train.epocs: unknown key (did you mean 'epochs'?)"]),
        (["--set", "train.subset.alpha=1.5"], ["train.subset.alpha: must be in (0, 1), got 1.5"]),
        (["--set", "forget_sets=[{name: x, kind: indices, indices: [5000]}]"],
         ["forget set 'x'", "index 5000 at position 0 is out of range"]),
    ],
)
def test_config_bad_input_exits_2(args, fragments):
    """A few cases through the console script; test_config.py checks every message in-process."""
    assert_bad_input(cli("config", str(TINY), *args), *fragments)


def test_missing_config_file_exits_2(tmp_path):
    assert_bad_input(cli("config", str(tmp_path / "nope.yaml")), "config file not found")


# ------------------------------------------------------------------------------------------ prepare
def test_prepare_writes_the_dataset_once(tmp_path):
    store = tmp_path / "store"
    plan = tiny_plan(store)
    result = cli("prepare", str(TINY), "--set", f"store={store}")
    assert result.returncode == 0, result.stderr
    assert f"prepare {plan.prepare.id}: 1437 train, 360 val" in result.stdout
    assert result.stderr == ""  # no FFCV writer bars
    complete = store / plan.prepare.rel / "COMPLETE.json"
    assert json.loads(complete.read_text())["n_train"] == 1437
    before = store_snapshot(store)
    again = cli("prepare", str(TINY), "--set", f"store={store}")
    assert again.returncode == 0 and plan.prepare.id in again.stdout
    assert store_snapshot(store) == before  # already complete: nothing rewritten


def test_prepare_with_a_bad_forget_set_exits_2_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    bad = tmp_path / "bad.npy"
    import numpy as np

    np.save(bad, np.array([3, 3]))
    result = cli("prepare", str(TINY), "--set", f"store={store}",
                 "--set", f"forget_sets=[{{name: dup, kind: indices, file: {bad}}}]")
    assert_bad_input(result, "forget set 'dup'", "duplicate index 3")
    assert not [p for p in store.rglob("*") if p.is_file()]


def test_prepare_cifar_without_the_folder_exits_2(tmp_path):
    store = tmp_path / "store"
    result = cli("prepare", str(TINY), "--set", f"store={store}", "--set", "data.dataset=cifar10",
                 "--data-root", str(tmp_path / "no-cifar"))
    assert_bad_input(result, "folder not found", "cifar-10-batches-py")
    assert not [p for p in store.rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------ status
TRAINED = {"full", "subset", "oracle[random10]", "oracle[tune]"}


def status_rows(store: Path) -> dict[str, dict]:
    result = cli("status", str(TINY), "--set", f"store={store}", "--json")
    assert result.returncode == 0, result.stderr
    return {row["stage"]: row for row in json.loads(result.stdout)}


def test_status_json_on_a_trained_store(tiny_store):
    plan = tiny_store.plan
    rows = status_rows(tiny_store.root)
    assert rows["prepare"]["state"] == "done" and rows["prepare"]["id"] == plan.prepare.id
    t = plan.cfg.train
    expected = {"full": t.full.models, "subset": t.subset.models + t.subset.heldout,
                "oracle[random10]": t.oracle.target + t.oracle.reference + t.oracle.eval,
                "oracle[tune]": t.oracle.target + t.oracle.reference + t.oracle.eval}
    for stage, total in expected.items():
        row = rows[stage]
        assert (row["state"], row["done"], row["total"]) == ("done", total, total), row
        assert row["bytes"] > 0
    assert rows["full"]["id"] == plan.full.id and rows["oracle[tune]"]["id"] == plan.oracle("tune").id
    assert rows["subset"]["detail"] == f"fit {t.subset.models}/{t.subset.models}, heldout {t.subset.heldout}/{t.subset.heldout}"


@pytest.fixture(scope="module")
def status_table(tiny_store):
    return cli("status", str(TINY), "--set", f"store={tiny_store.root}")


def test_status_table_on_a_trained_store(tiny_store, status_table):
    result = status_table
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout and "4/4" in result.stdout
    assert tiny_store.plan.full.id not in result.stdout  # ids only under --wide


def test_status_table_names_the_forget_set_of_each_oracle_stage(status_table):
    """Rich would read `[random10]` as a markup tag and drop it, unless the cell is escaped."""
    result = status_table
    assert "oracle[random10]" in result.stdout and "oracle[tune]" in result.stdout


def test_config_table_names_the_forget_set_of_each_oracle_stage(config_run):
    _, result = config_run
    assert "oracle[random10]" in result.stdout and "oracle[tune]" in result.stdout


def test_status_of_a_partial_store(tiny_store, tmp_path):
    root = copy_store(tiny_store.root, tmp_path / "store")
    plan = tiny_store.plan
    next((root / plan.subset.rel / "markers" / "fit").glob("*.json")).unlink()
    rows = status_rows(root)
    total = plan.cfg.train.subset.models + plan.cfg.train.subset.heldout
    block = plan.cfg.execution.block_size
    assert (rows["subset"]["state"], rows["subset"]["done"]) == ("partial", total - block)
    assert rows["full"]["state"] == "done"


def test_status_of_an_empty_store_creates_nothing(tmp_path):
    store = tmp_path / "store"
    rows = status_rows(store)
    assert rows["prepare"]["state"] == "missing"
    assert all(rows[s]["state"] == "missing" and rows[s]["done"] == 0 for s in TRAINED)
    assert not store.exists()


STATUS_RUN = """
import sys, time
t0 = time.perf_counter()
from pipeline.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    assert exc.code in (0, None), exc.code
print("IMPORTED", sorted(m for m in ("torch", "ray", "ffcv", "sklearn") if m in sys.modules))
print(f"SECONDS {time.perf_counter() - t0:.2f}")
"""


@pytest.fixture(scope="module")
def mixed_store(tiny_finished, tmp_path_factory):
    """A finished tiny store, then: finetune on random10 lost its last model (partial), do_nothing
    on random10 removed (missing), gradient_ascent (a grid) kept as selected."""
    plan = tiny_finished["plan"]
    root = copy_store(tiny_finished["root"], tmp_path_factory.mktemp("mixed") / "store")
    rows = {r["stage"]: r for r in json.loads(cli("status", str(TINY), "--set", f"store={root}", "--json").stdout)}
    finetune = root / "unlearn" / f"unlearn-{rows['unlearn[finetune,random10]']['id']}"
    marker = sorted((finetune / "markers").rglob("*.json"))[-1]  # the run ending at the last model: end it before
    record = json.loads(marker.read_text())
    record["end"] -= 1
    marker.unlink()
    (marker.parent / f"{record['start']:07d}-{record['end']:07d}.json").write_text(json.dumps(record))
    import shutil

    shutil.rmtree(root / "unlearn" / f"unlearn-{rows['unlearn[do_nothing,random10]']['id']}")
    return root, plan


def test_status_shows_unlearning_as_a_method_by_forget_set_grid_in_80_columns(mixed_store):
    root, plan = mixed_store
    result = cli("status", str(TINY), "--set", f"store={root}", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.stdout
    start = next(i for i, line in enumerate(lines) if line.startswith("unlearning"))
    stop = next(i for i, line in enumerate(lines) if line.startswith("hyperparameter grids"))
    grid, tuning = lines[start:stop], lines[stop:]
    header = next(line for line in grid if line.split()[:1] == ["method"])
    assert header.split() == ["method", "random10"]
    row = {line.split()[0]: line.split()[1:] for line in grid if line.split()[:1] in (["do_nothing"], ["finetune"],
                                                                                      ["gradient_ascent"])}
    n = plan.cfg.train.full.models
    assert row == {"do_nothing": ["missing"], "finetune": [f"{n - 1}/{n}"], "gradient_ascent": ["done"]}
    for stage in ("prepare", "full", "subset", "oracle[random10]", "oracle[tune]"):
        assert any(line.split()[:2] == [stage, "done"] for line in lines), stage
    fit = next(line for line in lines if line.split()[:1] == ["fit"])
    lds = json.loads((root / plan.fit.rel / "COMPLETE.json").read_text())["lds_mean"]
    assert fit.split()[:3] == ["fit", "done", "1797/1797"] and f"LDS {lds:.3f}" in fit
    tuning = [line for line in tuning if line.split()[:1] == ["gradient_ascent"]]
    assert len(tuning) == 2 and sum("chosen" in line for line in tuning) == 1 and all("done" in t for t in tuning)
    assert plan.full.id not in result.stdout


def test_status_wide_and_json_show_ids_and_bytes(mixed_store):
    root, plan = mixed_store
    wide = cli("status", str(TINY), "--set", f"store={root}", "--wide", env={"COLUMNS": "80"})
    assert wide.returncode == 0, wide.stderr
    rows = json.loads(cli("status", str(TINY), "--set", f"store={root}", "--json").stdout)
    by_stage = {r["stage"]: r for r in rows}
    for r in rows:
        if r["id"] is not None:
            assert r["id"] in wide.stdout, r["stage"]
        assert isinstance(r["bytes"], int)
    assert by_stage["full"]["id"] == plan.full.id and by_stage["full"]["bytes"] > 0
    assert by_stage["fit"]["id"] == plan.fit.id and by_stage["fit"]["lds_mean"] is not None
    cell = by_stage["unlearn[finetune,random10]"]
    n = plan.cfg.train.full.models
    assert (cell["method"], cell["forget_set"], cell["state"], cell["done"], cell["total"]) == \
        ("finetune", "random10", "partial", n - 1, n)
    assert cell["hparams"]["lr"] == 0.01 and cell["hparams"]["momentum"] == 0.9  # defaults included
    assert (by_stage["unlearn[do_nothing,random10]"]["state"], by_stage["unlearn[do_nothing,random10]"]["bytes"]) == \
        ("missing", 0)
    points = [r for r in rows if r["section"] == "tune"]
    assert [r["hparams"]["lr"] for r in points] == [0.001, 0.01] and sum(r["chosen"] for r in points) == 1


def test_status_reads_the_store_without_torch_or_ray(tiny_finished):
    before = store_snapshot(tiny_finished["root"])
    proc = subprocess.run([sys.executable, "-c", STATUS_RUN, "status", str(TINY), "--set",
                           f"store={tiny_finished['root']}"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "IMPORTED []" in proc.stdout, proc.stdout
    assert store_snapshot(tiny_finished["root"]) == before


def test_status_bad_input_exits_2():
    assert_bad_input(cli("status", str(TINY), "--set", "train.epocs=3"), "did you mean 'epochs'")


# ------------------------------------------------------------------------------------------ train
def test_train_with_an_unknown_family_exits_2(tmp_path):
    store = tmp_path / "store"
    assert_bad_input(cli("train", str(TINY), "--set", f"store={store}", "--family", "everything"),
                     "--family 'everything'", "full, subset, oracle")


# ------------------------------------------------------------------------------------------ unlearn
def test_a_bad_method_hyperparameter_exits_2_worded_as_a_config_error(tmp_path):
    store = tmp_path / "store"
    result = cli("unlearn", str(TINY), "--set", f"store={store}", "--set", "unlearn.methods.finetune.lr=-1")
    assert_bad_input(result, "unlearn.methods.finetune.lr: must be > 0, got -1")
    assert "errors.pydantic.dev" not in result.stderr and "validation error" not in result.stderr
    assert not store.exists()
    result = cli("config", str(TINY), "--set", f"store={store}", "--set", "unlearn.methods.finetune.lr=-1")
    assert_bad_input(result, "unlearn.methods.finetune.lr: must be > 0, got -1")  # `config` checks them too
    assert not store.exists()


def test_evaluate_prints_p95_as_multiples_of_the_floor(tiny_finished):
    """`evaluate` reads like the report: the retrain row's own P95 (the floor), every other row's as a
    multiple of it with its bootstrap interval and the overlap marks."""
    from pipeline.stages.report import collect_rows, p95_cell

    root, plan = tiny_finished["root"], tiny_finished["plan"]
    result = cli("evaluate", str(TINY), "--set", f"store={root}", env={"COLUMNS": "250"})
    assert result.returncode == 0, result.stderr
    assert "[bootstrap 95% interval]" in result.stdout
    rows = collect_rows(plan)
    floor = next(r for r in rows if r["method"] == "retrain")
    nothing = next(r for r in rows if r["method"] == "do_nothing")
    assert p95_cell(floor, "forget") == f"{floor['klom']['forget']['p95']:.3f} (1x)"
    assert p95_cell(floor, "forget") in result.stdout and p95_cell(nothing, "retain") in result.stdout
    assert p95_cell(nothing, "forget").startswith(f"{nothing['vs_floor']['forget']['x']:.2f}x [")
