"""A fit task's memory (decision 35): predicted from the config, checked against a measured peak, and a
config the device cannot hold refused before any task; the per-logit datamodels' LDS (decision 34)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, TINY, cli, copy_store, store_snapshot, tiny_plan

PROBE = REPO / "tests" / "fit_memory_probe.py"

# measured / predicted peak (growth of resident anonymous memory in a subprocess running a fit task's arrays, tests/
# fit_memory_probe.py, glibc's mmap threshold fixed at 64 KiB so that a freed array leaves RSS at once), on
# this CPU: diff-in-means 8,192 models x 1,437 points in batches of 1,000: 0.90; LASSO (cd) 2,048 models
# 0.84; ridge 2,048 models (primal) 1.01, 1,000 models x 3,000 points (dual) 0.72; held-out scoring of 2,000
# models x 1,408 datamodels 1.01-1.04 (ranks). With glibc's default (dynamic) threshold the scoring phase
# measured 1.2-1.6x, run to run: allocator slack the prediction leaves out. Below ~10 MB the slack
# dominates, so the sizes are larger.
AGREEMENT = (0.65, 1.3)
SIZES = {
    "diff_in_means": {"estimator": "diff_in_means", "models": 8192, "n": 1437, "targets": 64, "classes": 10,
                      "heldout": 64, "model_batch": 1000},
    "lasso": {"estimator": "lasso", "models": 2048, "n": 1437, "targets": 32, "classes": 10, "heldout": 64},
    "ridge_dual": {"estimator": "ridge", "models": 1000, "n": 3000, "targets": 32, "classes": 10, "heldout": 64},
    "scoring": {"estimator": "diff_in_means", "models": 2000, "n": 3000, "targets": 128, "classes": 10,
                "heldout": 2000},
}


def _probe(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, str(PROBE), json.dumps(spec)], capture_output=True, text=True,
                         timeout=600, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("size", [
    "diff_in_means", *(pytest.param(s, marks=pytest.mark.slow) for s in ("lasso", "ridge_dual", "scoring")),
])
def test_predicted_peak_agrees_with_the_measured_one(size):
    got = _probe(SIZES[size])
    ratio = got["measured"] / got["predicted"]
    assert AGREEMENT[0] <= ratio <= AGREEMENT[1], got


def test_peak_is_flat_in_the_models_but_for_bool_masks_and_outputs():
    """From 20,000 to 300,000 diff-in-means models at CIFAR-10's size, the prediction grows by the bool
    masks and the outputs only: the float buffer stays (model_batch, n)."""
    from pipeline.datamodels.memory import fit_peak_bytes

    def peak(models: int):
        return fit_peak_bytes(estimator="diff_in_means", models=models, n_train=50_000, targets=512, call_targets=48,
                              classes=10, per_logit=True, heldout=1000, model_batch=4096, solver="fista")

    small, large = peak(20_000), peak(300_000)
    assert small.parts["mask float buffer"] == large.parts["mask float buffer"] == 4096 * 50_000 * 4
    grown = {k: large.parts[k] - small.parts.get(k, 0) for k in large.parts if large.parts[k] != small.parts.get(k)}
    assert set(grown) == {"masks (bool)", "block outputs (margins, logits)", "call outputs", "centred outputs"}
    assert large.peak < 40 * 2**30  # issue 28's bound for diff-in-means at 300k models


def test_a_config_the_device_cannot_hold_is_refused_before_anything_is_stored(tiny_store, tmp_path):
    root = copy_store(tiny_store.root, tmp_path / "store")
    before = store_snapshot(root)
    result = cli("fit", str(TINY), "--set", f"store={root}", "--set", "execution.fit_memory_gb=0.001")
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    message = " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    for fragment in ("predicted to peak at", "MiB (held-out scoring: ", "execution.fit_memory_gb = 0.001",
                     "execution.fit_block_targets", "fit.model_batch"):
        assert fragment in message, message
    assert store_snapshot(root) == before


def test_the_check_passes_the_tiny_config_on_this_machine(tiny_store):
    from pipeline.stages.fit import check_memory, device_memory

    plan = tiny_plan(tiny_store.root)
    prediction = check_memory(plan, plan.prepared_meta())
    assert 0 < prediction.peak < device_memory(plan.cfg)[0]


def test_per_logit_lds_is_stored_summarised_and_equal_to_a_direct_recomputation(tiny_finished):
    import torch

    from pipeline.datamodels import lds
    from pipeline.plan import family_store
    from pipeline.stages.fit import _subset_family

    plan = tiny_finished["plan"]
    meta = plan.prepared_meta()
    group = plan.store.open_group(f"{plan.fit.rel}/arrays.zarr", mode="r")
    stored = group["lds_logit"][:]
    n_held, (p, c) = plan.cfg.train.subset.heldout, stored.shape
    assert (p, c) == (meta["n_train"] + meta["n_val"], meta["classes"])
    held = family_store(plan, _subset_family(plan, "heldout"), meta)
    theta_logit = torch.as_tensor(group["theta_logit"][:].astype(np.float32)).reshape(meta["n_train"], p * c)
    direct = lds(theta_logit, torch.as_tensor(group["bias_logit"][:]).reshape(-1),
                 torch.as_tensor(held.read("masks", n_held)),
                 torch.as_tensor(held.read("logits", n_held)).reshape(n_held, p * c)).reshape(p, c).numpy()
    np.testing.assert_allclose(stored, direct, rtol=0, atol=1e-6, equal_nan=True)
    finite = stored[np.isfinite(stored)]
    assert finite.size > 0.9 * stored.size and np.all(np.abs(finite) <= 1)
    summary = plan.store.read_json(f"{plan.fit.rel}/COMPLETE.json")
    n = meta["n_train"]
    assert summary["lds_logit_mean"] == pytest.approx(float(np.nanmean(stored)))
    assert summary["lds_logit_per_class"] == pytest.approx([float(np.nanmean(stored[:, k])) for k in range(c)])
    assert summary["lds_logit_train_mean"] == pytest.approx(float(np.nanmean(stored[:n])))
    assert summary["lds_logit_val_mean"] == pytest.approx(float(np.nanmean(stored[n:])))
    assert summary["lds_logit_mean"] > 0  # subset models' logits are predictable from their masks


def test_model_batch_enters_the_fit_identity_only_when_set(tmp_path):
    """Unset (4096), the fit's identity is what it was before batching (the digits and tiny defaults hold
    fewer models than a batch, so their arrays are the same bits); set, a sum over several batches rounds
    differently, so it is part of the identity."""
    unset, set_ = tiny_plan(tmp_path), tiny_plan(tmp_path, "fit.model_batch=1000")
    assert "model_batch" not in unset.cfg.fit.section() and set_.cfg.fit.section()["model_batch"] == 1000
    assert unset.fit.id != set_.fit.id
