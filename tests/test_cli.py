"""The `oracle-farm` console script as users run it: exit code 0 on success, 2 on bad input with a
message and no traceback, and the store left alone by commands that only read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import TINY, cli, copy_store, store_snapshot, tiny_plan


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
    assert tiny_store.plan.full.id in result.stdout and "done" in result.stdout
    assert "models 4/4" in result.stdout


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


def test_status_bad_input_exits_2():
    assert_bad_input(cli("status", str(TINY), "--set", "train.epocs=3"), "did you mean 'epochs'")


# ------------------------------------------------------------------------------------------ train
def test_train_with_an_unknown_family_exits_2(tmp_path):
    store = tmp_path / "store"
    assert_bad_input(cli("train", str(TINY), "--set", f"store={store}", "--family", "everything"),
                     "--family 'everything'", "full, subset, oracle")
