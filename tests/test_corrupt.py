"""Damaged or foreign files in a store, met by a later command: exit 2 with a message naming the file
(or the rows and their marker) and the fix, the store left as it was; then the fix works. A prepared
`.beton` is checked against the size and sha256 the prepare stage recorded; a block's rows against
the sha256 in its marker, when a later stage reads them whole."""

from __future__ import annotations

import json

import numpy as np
import zarr

from helpers import TINY, cli, copy_store, store_snapshot

SOLO = ("--set", "unlearn.methods={}")  # evaluate scores the retrain row only: reads the oracle families


def assert_bad_input(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())  # rich may wrap long lines
    for fragment in fragments:
        assert fragment in said, result.stderr


def test_a_truncated_beton_is_named_with_its_fix_and_prepare_writes_it_again(tiny_store, tmp_path):
    plan = tiny_store.plan
    root = copy_store(tiny_store.root, tmp_path / "store")
    path = root / plan.prepare.rel / "train.beton"
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    before = store_snapshot(root)
    result = cli("train", str(TINY), "--set", f"store={root}")
    assert_bad_input(result, f"{path}: {len(original) // 2} bytes where the prepare stage recorded {len(original)}",
                     "remove it and run `oracle-farm prepare CONFIG`", "`oracle-farm prepare CONFIG --repair`")
    assert "negative dimensions" not in result.stderr
    assert store_snapshot(root) == before
    path.unlink()  # the fix the message gives
    again = cli("prepare", str(TINY), "--set", f"store={root}")
    assert again.returncode == 0, again.stderr
    assert path.read_bytes() == original  # written again exactly as prepare first wrote it
    assert cli("train", str(TINY), "--set", f"store={root}").stdout.strip().endswith("train: 0 models trained")


def test_a_foreign_beton_of_the_same_size_fails_its_checksum_and_repair_rewrites_it(tiny_store, tmp_path):
    plan = tiny_store.plan
    root = copy_store(tiny_store.root, tmp_path / "store")
    path = root / plan.prepare.rel / "val.beton"
    original = path.read_bytes()
    foreign = bytearray(original)
    foreign[len(foreign) // 2] ^= 0xFF  # one byte of one image
    path.write_bytes(bytes(foreign))
    before = store_snapshot(root)
    recorded = json.loads((root / plan.prepare.rel / "COMPLETE.json").read_text())["files"]["val.beton"]["sha256"]
    for command in ("prepare", "train"):
        result = cli(command, str(TINY), "--set", f"store={root}")
        assert_bad_input(result, f"{path}: its sha256", f"differs from the {recorded[:16]}... the prepare stage recorded",
                         "`oracle-farm prepare CONFIG --repair`")
        assert store_snapshot(root) == before
    repaired = cli("prepare", str(TINY), "--set", f"store={root}", "--repair")
    assert repaired.returncode == 0, repaired.stderr
    assert f"wrote {path} again" in repaired.stdout
    assert path.read_bytes() == original


def test_an_undecodable_zarr_chunk_is_named_when_a_later_stage_reads_it(tiny_store, tmp_path):
    plan = tiny_store.plan
    root = copy_store(tiny_store.root, tmp_path / "store")
    group = root / plan.oracle("random10").rel / "arrays.zarr"
    chunk = group / "reference" / "margins" / "c" / "0" / "0"  # the first block of models' rows
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size))
    before = store_snapshot(root)
    result = cli("evaluate", str(TINY), "--set", f"store={root}", *SOLO)
    assert_bad_input(result, f"{group}/reference/margins: a chunk of rows 0..", "cannot be read",
                     "re-run the stage that wrote them")
    assert store_snapshot(root) == before


def test_rows_that_differ_from_their_markers_checksum_are_named_with_the_marker(tiny_store, tmp_path):
    plan = tiny_store.plan
    root = copy_store(tiny_store.root, tmp_path / "store")
    group = root / plan.oracle("random10").rel / "arrays.zarr"
    margins = zarr.open_group(str(group), mode="r+")["eval/margins"]
    margins[2] = margins[2] + 1.0  # valid chunks, other values
    marker = next((root / plan.oracle("random10").rel / "markers" / "eval").glob("*.json"))
    block = json.loads(marker.read_text())
    before = store_snapshot(root)
    result = cli("evaluate", str(TINY), "--set", f"store={root}", *SOLO)
    assert_bad_input(result, f"{group}/eval/margins rows {block['start']}..{block['end']}: the data differs from the "
                             f"sha256 in their marker {marker}", f"remove the marker {marker}",
                     "`oracle-farm run CONFIG` redoes exactly the blocks without a marker")
    assert store_snapshot(root) == before
