"""The GPU check (decision 29) runs on the CPU in its quick mode and writes the same JSON shape as the
figures recorded on a GPU (bench/results/), so it cannot rot between the rare sessions with a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO
from pipeline.models import resolve_stacking

RECORDED = sorted((REPO / "bench" / "results").glob("gpu_check-*.json"))
CUDA_ONLY = {"name", "capability", "multiprocessors", "memory_gb", "cuda", "cudnn", "peak_bf16_tflops"}


def run_check(tmp_path, sections: str) -> dict:
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--quick", "--out", str(tmp_path),
                           "--sections", sections], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((tmp_path / "gpu_check.json").read_text())


def assert_same_shape(got: dict, recorded: dict) -> None:
    for name, section in got["sections"].items():
        if name not in recorded["sections"]:
            continue  # a section added after that GPU call
        want = set(recorded["sections"][name]) - (CUDA_ONLY if name == "env" else set())
        assert set(section) >= want, (name, want - set(section))


@pytest.mark.parametrize("recorded", RECORDED, ids=lambda p: p.name)
def test_quick_check_of_the_fast_sections_has_the_recorded_shape(tmp_path, recorded):
    got = run_check(tmp_path, "env,memory_plan,lasso")
    assert got["ok"] and got["sections"]["memory_plan"]["largest_block"] > 0
    assert_same_shape(got, json.loads(recorded.read_text()))


@pytest.mark.slow
def test_quick_check_of_the_new_sections_runs_on_the_cpu(tmp_path):
    got = run_check(tmp_path, "compile_identity,unlearning_throughput,streamed_fit")
    assert got["ok"], {k: v.get("error") for k, v in got["sections"].items()}
    assert got["sections"]["compile_identity"]["identical_across_processes"]
    assert all(v["passes_per_second_per_model"] > 0 for v in got["sections"]["unlearning_throughput"]["methods"].values())
    assert {r["estimator"] for r in got["sections"]["streamed_fit"]["rows"]} == {"diff_in_means", "lasso"}


@pytest.mark.slow
def test_quick_check_of_every_section_has_the_recorded_shape(tmp_path):
    got = run_check(tmp_path, "env,memory_plan,equivalence,bf16_digits,unlearning,lasso,throughput")
    assert got["ok"], {k: v.get("error") for k, v in got["sections"].items()}
    for recorded in RECORDED:
        assert_same_shape(got, json.loads(recorded.read_text()))
    assert got["sections"]["equivalence"]["cases"]["loop/fp32"]["max_abs_logit_diff"] == 0.0


def test_auto_stacking_follows_the_calibration():
    calibration = json.loads((REPO / "pipeline" / "models" / "stacking_calibration.json").read_text())
    assert resolve_stacking("auto", "cpu") == calibration["cpu"]["strategy"]
    assert resolve_stacking("streams", "cpu") == "loop"  # one stream is all a CPU has
    assert resolve_stacking("grouped", "cpu") == "grouped"
    with pytest.raises(ValueError, match="unknown stacking"):
        resolve_stacking("vmap", "cpu")
