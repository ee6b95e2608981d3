"""The sizing of `configs/cifar10.yaml` that infra/README.md shows, computed, so it cannot drift:

    PYTHONPATH=$PWD .venv/bin/python bench/sizing.py          # markdown, as in infra/README.md
    PYTHONPATH=$PWD .venv/bin/python bench/sizing.py --json

What is trained (families of the config), what unlearning costs (every method and grid point from
`pipeline.plan.method_grids`: reported runs of the chosen point on every reported set, every grid point
on the tuning set; example-passes per model by each method's recipe, in retrainings of
`retrain_example_passes`), GPU-hours at the trainer's measured throughput (bench/RESULTS.md), and the
store's bytes per array (uncompressed) from the shapes the stages create.

The example-passes of a method are its loops' counts (pipeline/unlearn/*.py), forward-only passes
weighted 1/3 (decision 22); where a loop's length depends on the data (CaMU's pairs, SFR-on's Fisher
passes) the count is the recipe's, marked as an estimate. The chosen grid point is not known before
tuning: reported runs are costed at the grid's mean.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cifar10.yaml"
# bench/RESULTS.md, GPU check 2026-11-27: 350-370 full-data 24-epoch ResNet-9 trainings per GPU-hour
# (H200, CUDA graphs, bf16, batch 512, `loop` blocks of 8); the H100 is the same chip
TRAININGS_PER_GPU_HOUR = 357
RESNET9_PARAMS = 2_270_000  # width 64 (infra/README.md's memory plan)


def _batches(n: int, batch: int) -> int:
    return -(-n // batch)


def example_passes(method: str, hp, n_forget: int, n_train: int, n_points: int) -> tuple[float, bool]:
    """Equivalent example-passes of one unlearned model (forward-only / 3), and whether it is an
    estimate (a loop whose length the recipe does not fix)."""
    r = n_train - n_forget
    if method == "do_nothing":
        return 0.0, False
    if method == "dm_direct":
        return n_points / 3, False  # one forward pass per point of train ++ val
    if method in ("dmm", "oracle_matching"):
        index = int(math.floor(hp.forget_multiplier)) * n_forget + int(math.floor(hp.retain_multiplier * n_forget))
        per_pass = _batches(index, hp.batch_size)
        passes = max(1, -(-hp.min_steps // (per_pass * hp.epochs))) if hp.min_steps else 1
        distinct = n_forget + int(math.floor(hp.retain_multiplier * n_forget))
        forward = distinct / 3 if method == "dmm" else 0.0  # dm-direct targets on the distinct points
        return hp.epochs * passes * index + forward, False
    if method == "finetune":
        return hp.epochs * r, False
    if method == "gradient_ascent":
        return hp.epochs * n_forget, False
    if method == "neggrad_plus":  # one retain batch and one forget batch per step
        return hp.epochs * (r + _batches(r, hp.batch_size) * min(hp.forget_batch_size, n_forget)), False
    if method == "scrub":  # max epochs over the forget set, min epochs over the retain set; teacher forward
        maxed = min(hp.msteps, hp.epochs) * n_forget
        return (maxed + hp.epochs * r) * (1 + 1 / 3), False
    if method == "del":  # criticality over the forget set, then fine-tuning on retain
        return n_forget + hp.epochs * r, False
    if method == "sfron":  # Fisher passes over forget and retain, then n_iters retain steps, ascents
        return n_forget + r + hp.n_iters * hp.batch_size + hp.n_iters // hp.forget_freq * hp.batch_size, True
    if method == "camu":  # per epoch: forget, sample and counterfactual points; the original's forward
        return hp.epochs * (3 * n_forget + 2 * n_forget / 3), True
    raise KeyError(f"no cost model for method {method!r}")


def _forget_sizes(plan) -> dict[str, int]:
    return {name: len(idx) for name, idx in plan.forget_sets.items()}


def _plan():
    from pipeline.config import load_config
    from pipeline.data.forget_sets import resolve_forget_set
    from pipeline.plan import method_grids

    cfg = load_config(CONFIG)
    n_train, n_val, classes = 50_000, 10_000, 10
    labels = __import__("numpy").arange(n_train) % classes  # published/random sets do not read labels' values
    sizes = {s.name: len(resolve_forget_set(s, labels)) for s in cfg.all_forget_sets()}
    return cfg, method_grids(cfg), sizes, (n_train, n_val, classes)


def sizing() -> dict:
    from pipeline.plan import n_unlearned
    from pipeline.training.recipe import retrain_example_passes

    cfg, grids, sizes, (n_train, n_val, classes) = _plan()
    points = n_train + n_val
    t = cfg.train
    retrain = retrain_example_passes(t, n_train)
    reported = [fs.name for fs in cfg.forget_sets]
    tunings = sorted({cfg.tuning_set_for(fs).name for fs in reported if cfg.tuning_set_for(fs) is not None})
    upper = cfg.unlearn.upper_bound  # decision 32: every grid point on every reported set as well
    n_u = n_unlearned(cfg)
    alpha = t.subset.alpha
    oracle_models = sum(getattr(t.oracle, r) for r in ("target", "reference", "eval"))
    families = [
        ("full", t.full.models, f"{n_train:,} points", t.full.models),
        (f"subset (fit {t.subset.models:,} + held-out {t.subset.heldout:,})", t.subset.models + t.subset.heldout,
         f"alpha = {alpha}: ~{int(alpha * n_train):,} points", (t.subset.models + t.subset.heldout) * alpha),
        (f"oracles: {len(sizes)} forget sets x ({t.oracle.target} target + {t.oracle.reference} reference + "
         f"{t.oracle.eval} eval)", len(sizes) * oracle_models, f"{n_train:,} - |F|",
         sum(oracle_models * (n_train - s) / n_train for s in sizes.values())),
    ]
    methods = []
    for name, grid in grids.items():
        per_point = [example_passes(name, hp, 0, n_train, points) for hp in grid]
        rep = sum(sum(example_passes(name, hp, sizes[fs], n_train, points)[0] for hp in grid) / len(grid)
                  for fs in reported) * n_u
        tuned_on = (tunings + (reported if upper else [])) if len(grid) > 1 else []
        tune = sum(example_passes(name, hp, sizes[fs], n_train, points)[0] for hp in grid for fs in tuned_on) * n_u
        methods.append({"method": name, "grid_points": len(grid), "estimate": any(e for _, e in per_point),
                        "reported_runs": len(reported) * n_u, "tuning_runs": len(grid) * len(tuned_on) * n_u,
                        "retrainings_reported": rep / retrain, "retrainings_tuning": tune / retrain})
    train_equiv = sum(f[3] for f in families)
    unlearn_equiv = sum(m["retrainings_reported"] + m["retrainings_tuning"] for m in methods)
    gpu_hours = (train_equiv + unlearn_equiv) / TRAININGS_PER_GPU_HOUR
    runs = sum(m["reported_runs"] + m["tuning_runs"] for m in methods)
    storage = _storage(cfg, sizes, (n_train, n_val, classes), runs)
    return {"config": str(CONFIG.relative_to(REPO)), "retrain_example_passes": retrain,
            "forget_set_sizes": sizes, "tuning_sets": tunings, "upper_bound": upper, "families": [
                {"family": f[0], "models": f[1], "data": f[2], "retrainings": f[3]} for f in families],
            "trainings": sum(f[1] for f in families), "training_retrainings": train_equiv,
            "methods": methods, "grid_points": sum(m["grid_points"] for m in methods),
            "unlearning_retrainings": unlearn_equiv, "trainings_per_gpu_hour": TRAININGS_PER_GPU_HOUR,
            "gpu_hours": gpu_hours, "storage": storage}


def _storage(cfg, sizes: dict, shape: tuple, unlearn_runs: int) -> list[dict]:
    """Uncompressed bytes per stored array, from the shapes the stages create (storage_layout.md)."""
    n_train, n_val, classes = shape
    p = n_train + n_val
    t = cfg.train
    per_model = {"margins": p * 4, "logits": p * classes * 2, "accuracy": 8}
    sub = t.subset.models + t.subset.heldout
    oracles = len(sizes) * sum(getattr(t.oracle, r) for r in ("target", "reference", "eval"))
    rows = [
        ("full", "margins + logits + accuracy", t.full.models, sum(per_model.values())),
        ("full", "weights (float32 safetensors)", t.full.models, RESNET9_PARAMS * 4 + 64 * 1024),
        ("subset", "margins (float32)", sub, per_model["margins"]),
        ("subset", "logits (float16)", sub, per_model["logits"]),
        ("subset", "masks (bool)", sub, n_train),
        ("oracle", "margins + logits + accuracy", oracles, sum(per_model.values())),
        ("fit", "theta (float32)", 1, n_train * p * 4),
        ("fit", "theta_rows (float32)", 1, n_train * p * 4),
        ("fit", "theta_logit (float16)", 1, n_train * p * classes * 2),
        ("fit", "bias, lds, lam, bias_logit", 1, p * 4 * 3 + p * classes * 4),
        ("unlearn", f"margins + logits + accuracy ({unlearn_runs:,} runs)", unlearn_runs, sum(per_model.values())),
    ]
    return [{"stage": s, "array": a, "count": n, "bytes_each": b, "bytes": n * b} for s, a, n, b in rows]


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB" if x >= 1e9 else f"{x / 1e6:,.1f} MB"


def sizing_markdown(s: dict | None = None) -> str:
    s = s or sizing()
    out = ["#### What is trained", "", "| family | models | data per model | full-training equivalents |",
           "|---|---|---|---|"]
    for f in s["families"]:
        out.append(f"| {f['family']} | {f['models']:,} | {f['data']} | {f['retrainings']:,.0f} |")
    out.append(f"| **trainings** | **{s['trainings']:,}** | | **{s['training_retrainings']:,.0f}** |")
    tuned = ", ".join(s["tuning_sets"]) + (" and every reported set (upper bound)" if s["upper_bound"] else "")
    out += ["", f"#### Unlearning ({len(s['methods'])} methods, {s['grid_points']} grid points; grids tuned on "
                f"{tuned}; one retraining = {s['retrain_example_passes']:,} example-passes)", "",
            "| method | grid points | reported runs | tuning runs | retrainings (reported) | retrainings (tuning) |",
            "|---|---|---|---|---|---|"]
    for m in s["methods"]:
        mark = " (est.)" if m["estimate"] else ""
        out.append(f"| {m['method']}{mark} | {m['grid_points']} | {m['reported_runs']:,} | {m['tuning_runs']:,} | "
                   f"{m['retrainings_reported']:,.1f} | {m['retrainings_tuning']:,.1f} |")
    total = s["unlearning_retrainings"]
    out.append(f"| **all** | **{s['grid_points']}** | | | | **{total:,.0f}** |")
    out += ["", "#### GPU time", "", "```",
            f"GPU-hours = ({s['training_retrainings']:,.0f} + {total:,.0f}) full-training equivalents / "
            f"{s['trainings_per_gpu_hour']} per GPU-hour ~ {s['gpu_hours']:,.0f} GPU-hours (H100/H200)",
            f"wall clock = {s['gpu_hours']:,.0f} / 16 GPUs ~ {s['gpu_hours'] / 16:.1f} h     "
            f"({s['gpu_hours'] / 8:.1f} h on 8; {s['gpu_hours'] / 32:.1f} h on 32)", "```", "",
            "#### Store (uncompressed)", "", "| stage | array | count | each | total |", "|---|---|---|---|---|"]
    for r in s["storage"]:
        out.append(f"| {r['stage']} | {r['array']} | {r['count']:,} | {_gb(r['bytes_each'])} | {_gb(r['bytes'])} |")
    out.append(f"| **all** | | | | **{_gb(sum(r['bytes'] for r in s['storage']))}** |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The sizing of configs/cifar10.yaml (infra/README.md)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(sizing(), indent=1) if args.json else sizing_markdown())
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
