"""A full disk: a real size-limited file system (a tmpfs mounted for the test, `faults.Tmpfs`: the tests
run as root here; they are skipped where mounting is not permitted) under a local store. (The worker
cache, $ORACLE_FARM_CACHE, of a store on S3 is filled the same way in tests/test_faults_store.py.)

The store's tmpfs holds the prepared files and about a megabyte more, so `oracle-farm train` runs out
of space part way. The command exits 1 naming the path and the bytes the write needed (pipeline.store.NoSpace), no temporary
file is left, every marker has its rows, and after the file system is grown (the space freed) a re-run
completes with arrays bit-identical to the session's undisturbed run.
"""

from __future__ import annotations

import time

from faults import assert_bit_identical, assert_marked_rows_whole, kib_used, mounts, no_temporaries  # noqa: F401
from helpers import TINY, cli, copy_store, family_arrays, tiny_plan


def test_a_full_local_store_exits_1_naming_the_path_then_a_rerun_after_freeing_space_completes(
        mounts, tiny_store, tmp_path):
    root = tmp_path / "store"
    disk = mounts(root, kib_used(tiny_store.root / "prepare") + 1024)  # the prepared files and ~1 MB more
    copy_store(tiny_store.root / "prepare", root / "prepare")
    args = ["train", str(TINY), "--set", f"store={root}", "--set", "execution.lease_ttl=2"]
    first = cli(*args)
    message = " ".join(first.stderr.split())
    assert first.returncode == 1, first.stdout + first.stderr[-3000:]
    assert f"{root}/" in message and "no space left on the device" in message and "bytes needed" in message, message
    assert not no_temporaries(root)
    plan = tiny_plan(root)
    assert_marked_rows_whole(plan)

    disk.grow(64 * 1024)  # space freed
    t0 = time.monotonic()
    again = cli(*args)
    print(f"fault-table: full store disk | train | exit 1, re-run | {time.monotonic() - t0:.1f} s re-run; "
          f"said: {message[message.index('no space') - 120:][:400]}")
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert_bit_identical(family_arrays(plan), family_arrays(tiny_store.plan))
    assert not no_temporaries(root)
