"""Compiled training (decision 38): `train.compile: inductor` gives the same bits run to run in fresh
processes with empty compile caches, and the choice is part of the train recipe's identity."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One block of 3 digits CNNs (convolutions + BatchNorm, grouped), 2 epochs, compiled: the sha256 of every
# member's state dict and of its logits, printed by a fresh interpreter.
TRAIN_ONE_BLOCK = """
import hashlib, sys
import numpy as np, torch
from pipeline.batches import Member, derive_seed
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.data.datasets import load_dataset
from pipeline.data.device import DeviceData
from pipeline.training.recipe import evaluate_members, train_members

torch.set_num_threads(1)
ds = load_dataset(DataConfig())
mean, std = ds.channel_stats()
data = DeviceData(ds.train_x[:512], ds.train_y[:512], ds.val_x[:128], ds.val_y[:128], mean, std)
members = [Member(derive_seed("compile", i), np.arange(512)) for i in range(3)]
cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, warmup_epochs=1, compile=sys.argv[1])
model, _ = train_members(ModelConfig(name="cnn", hidden=8), cfg, data, members, 10, stacking="grouped")
digest = hashlib.sha256()
for name, t in sorted(model.state_dict().items()):
    digest.update(name.encode()); digest.update(t.detach().contiguous().numpy().tobytes())
digest.update(evaluate_members(model, data)["logits"].tobytes())
print(digest.hexdigest())
"""


def train_in_fresh_process(mode: str, cache: Path) -> str:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton"),
           "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "0"}
    out = subprocess.run([sys.executable, "-c", TRAIN_ONE_BLOCK, mode], env=env, capture_output=True, text=True,
                         timeout=900, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_compiled_training_is_identical_across_fresh_processes(tmp_path):
    first = train_in_fresh_process("inductor", tmp_path / "cache-a")
    second = train_in_fresh_process("inductor", tmp_path / "cache-b")
    assert first == second
    # and it is a different program from eager's (were it the same bits, compile could stay out of the id)
    assert train_in_fresh_process("off", tmp_path / "cache-c") != first


def test_compile_is_part_of_the_recipe_identity_only_when_on():
    from pipeline.config import TrainConfig

    off, on = TrainConfig(), TrainConfig(compile="inductor")
    assert "compile" not in off.recipe()  # stores made before the field keep their ids
    assert on.recipe()["compile"] == "inductor"
    h = [hashlib.sha256(repr(sorted(c.recipe().items())).encode()).hexdigest() for c in (off, on)]
    assert h[0] != h[1]


def test_plan_ids_move_with_compile():
    from helpers import TINY

    from pipeline.config import load_config
    from pipeline.plan import Plan
    from pipeline.store import Store

    base = Plan(load_config(TINY), Store("/tmp/unused-store"))
    compiled = Plan(load_config(TINY, ["train.compile=inductor"]), Store("/tmp/unused-store"))
    assert base.full.id != compiled.full.id and base.subset.id != compiled.subset.id
    assert base.prepare.id == compiled.prepare.id
