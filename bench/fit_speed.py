"""Speed and quality of our LASSO datamodels against sklearn fitted target by target, on real targets.

Default workload (``--workload digits``): the real datamodel targets of the digits default, i.e. the
margins and the per-class logits of its subset-model family (masks over the training points; the
config's ``train.subset`` sizes and ``fit.lasso`` settings). The script trains that family into a
scratch store (``bench/out/fit-speed-store``, reused by later runs) or reads it from ``--store``. It
times two workloads separately: ``--targets`` margin targets, and the logits of every class of
``--logit-targets`` targets (one datamodel per target and class, as the fit stage's per-logit
datamodels). ``--workload planted`` keeps the synthetic data (i.i.d. Bernoulli(1/2) masks, outputs a
few strong effects per target on top of a small dense same-class effect, Gaussian noise).

Both fits use the same split of the models, the same lambda path (lam_max * eps^(j / (k - 1)) on
standardised features), the same per-target lambda selection by validation MSE, the same refit on
all models and the same stopping rules (sklearn's duality gap: ``tol`` for the refit, the config's
``path_tol`` for the path's solutions, which only choose lambda). sklearn gets its fastest
route: one warm-started ``lasso_path`` call per lambda without input checks, with BLAS held to one
thread (``--sklearn-blas-threads``; with BLAS's default threads its serial solver runs ~3x slower on
2 cores). Ours (``--solver``: compiled coordinate descent, the CPU default, or the
batched torch FISTA that GPUs run) gets one thread unless ``--threads`` says otherwise: core for
core against that serial solver. Quality is the mean LDS on held-out models; the script fails if
ours and sklearn's differ by more than 0.01. Each line prints the time per target (per datamodel)
and the ratio; ours is timed best of ``--repeats``, sklearn best of ``--sklearn-repeats``, in the same run.

    .venv/bin/python bench/fit_speed.py [--store DIR] [--targets 200 --logit-targets 20]
    .venv/bin/python bench/fit_speed.py --workload planted [--models 600 --features 1437 --targets 300 ...]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import Lasso, lasso_path
from threadpoolctl import threadpool_limits

from pipeline.datamodels import diff_in_means, lasso, lasso_design, lds

ROOT = Path(__file__).resolve().parents[1]


def planted(models: int, features: int, targets: int, *, classes: int = 10, seed: int = 0):
    """masks (models, features) bool, outputs (models, targets) float32, w_true (features, targets)."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(models, features, generator=g) < 0.5
    feat_cls = torch.randint(classes, (features,), generator=g)
    tgt_cls = torch.randint(classes, (targets,), generator=g)
    w = 0.01 * (feat_cls[:, None] == tgt_cls[None, :]).float()  # weak dense same-class help
    strong = torch.randint(features, (8, targets), generator=g)  # a few near-duplicates per target
    w.scatter_add_(0, strong, 0.3 * torch.randn(8, targets, generator=g).abs())
    bias = torch.randn(targets, generator=g)
    outputs = bias + masks.float() @ w + 0.5 * torch.randn(models, targets, generator=g)
    return masks, outputs, w


def sklearn_lasso(
    masks: np.ndarray, outputs: np.ndarray, *, n_lambdas, eps, val_fraction, seed, min_lambdas, tol, max_iter,
    path_tol=None, patience=1, dtype=np.float64,
):
    """The procedure of pipeline.datamodels.lasso, one target at a time with sklearn's coordinate descent.

    masks (m, n) bool, outputs (m, t) -> raw-unit weight (n, t), bias (t,), lambda (t,).
    """
    outputs = outputs.astype(dtype)
    m, n = masks.shape
    n_val = round(val_fraction * m)
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed)).numpy()
    val, fit = perm[:n_val], perm[n_val:]
    X = masks.astype(dtype)

    def standardise(rows):
        mu, sd = X[rows].mean(0), X[rows].std(0)
        sd[sd == 0] = 1
        return mu, sd

    mu_f, sd_f = standardise(fit)
    mu_a, sd_a = standardise(np.arange(m))
    xf, xv, xa = (X[fit] - mu_f) / sd_f, (X[val] - mu_f) / sd_f, (X - mu_a) / sd_a
    xf = np.asfortranarray(xf)
    t = outputs.shape[1]
    weight, bias, chosen = np.zeros((n, t), dtype), np.zeros(t, dtype), np.zeros(t, dtype)
    for j in range(t):
        yf = outputs[fit, j] - outputs[fit, j].mean()
        lam_max = max(np.abs(xf.T @ yf).max() / len(fit), np.finfo(np.float64).tiny)
        alphas = lam_max * eps ** (np.arange(n_lambdas) / max(n_lambdas - 1, 1))
        coef, best_mse, last_mse, rises, best = np.zeros(n, dtype), np.inf, np.inf, 0, None
        for k, alpha in enumerate(alphas):  # warm-started path, stopped by the same rule as ours
            _, c, _ = lasso_path(xf, yf, alphas=[alpha], coef_init=coef, tol=path_tol or tol, max_iter=max_iter,
                                 check_input=False)
            coef = c[:, 0]
            mse = np.mean((outputs[val, j] - outputs[fit, j].mean() - xv @ coef) ** 2)
            if mse < best_mse:
                best_mse, best = mse, (alpha, coef / sd_f)
            rises = rises + 1 if mse > last_mse else 0
            if min_lambdas is not None and k + 1 >= min_lambdas and rises >= patience:
                break
            last_mse = mse
        model = Lasso(alpha=best[0], tol=tol, max_iter=max_iter, warm_start=True)
        model.coef_ = best[1] * sd_a  # warm start, in the all-model standardisation
        model.fit(xa, outputs[:, j])
        weight[:, j] = model.coef_ / sd_a
        bias[j] = model.intercept_ - mu_a @ weight[:, j]
        chosen[j] = best[0]
    return weight, bias, chosen


def digits_family(config: str, store: str | None) -> dict:
    """The subset family of a config (trained into a scratch store unless store holds it): masks and
    outputs of the fitting models and of the held-out models, and the config's LASSO settings."""
    from pipeline.config import load_config
    from pipeline.plan import Plan, family_store
    from pipeline.stages.fit import _subset_family
    from pipeline.stages.prepare import run_prepare
    from pipeline.stages.train import run_train
    from pipeline.store import Store

    store = store or str(ROOT / "bench/out/fit-speed-store")
    cfg = load_config(config, [f"store={store}"])
    plan = Plan(cfg, Store(cfg.store))
    run_prepare(plan)
    run_train(plan, kinds=("subset",))  # nothing to do when the family is there
    meta = plan.prepared_meta()
    sub = cfg.train.subset
    out = {}
    for role, n in (("fit", sub.models), ("heldout", sub.heldout)):
        fam = family_store(plan, _subset_family(plan, role), meta)
        out[role] = {name: torch.as_tensor(fam.array(name)[:n]) for name in ("masks", "margins", "logits")}
    out["lasso"] = cfg.fit.lasso
    # datamodels that share one design in a fit task, on average over the stage's tasks (the last block is
    # short): its targets' margins and, per logit, every class's
    outputs_per_target = 1 + (meta["classes"] if cfg.fit.per_logit else 0)
    n_points = meta["n_train"] + meta["n_val"]
    tasks = -(-n_points // cfg.execution.fit_block_targets)
    out["task_datamodels"] = round(n_points * outputs_per_target / tasks)
    return out


def workloads(a) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]], dict]:
    """[(name, fit masks, fit outputs, held-out masks, held-out outputs)], LASSO settings; sets
    a.task_datamodels (digits: how many datamodels share one design in a fit task; planted: None)."""
    opts = dict(n_lambdas=a.n_lambdas, eps=a.eps, val_fraction=a.val_fraction, seed=a.seed,
                min_lambdas=a.min_lambdas or None, patience=a.patience, tol=a.tol, max_iter=a.max_iter,
                path_tol=a.path_tol or None)
    a.task_datamodels = None
    if a.workload == "planted":
        masks, outputs, _ = planted(a.models + a.heldout, a.features, a.targets, seed=a.seed)
        return [("planted", masks[: a.models], outputs[: a.models], masks[a.models :], outputs[a.models :])], opts
    fam = digits_family(a.config, a.store)
    a.task_datamodels = fam["task_datamodels"]
    lc = fam["lasso"]  # the config's settings, unless given on the command line
    for key, value in (("n_lambdas", lc.n_lambdas), ("eps", lc.eps), ("val_fraction", lc.val_fraction),
                       ("tol", lc.tol), ("max_iter", lc.max_iter), ("path_tol", lc.path_tol),
                       ("patience", lc.patience or 1)):
        if getattr(a, key) is None:
            opts[key] = value
    fit, held = fam["fit"], fam["heldout"]
    n_points = fit["margins"].shape[1]
    g = torch.Generator().manual_seed(a.seed)  # targets spread over the training and validation points
    margin_t = torch.randperm(n_points, generator=g)[: a.targets].sort().values
    logit_t = torch.randperm(n_points, generator=g)[: a.logit_targets].sort().values

    def logits(part):  # (models, targets x classes): every class of each chosen target
        return part["logits"][:, logit_t].float().reshape(part["logits"].shape[0], -1)

    return [
        ("margins", fit["masks"], fit["margins"][:, margin_t].float(), held["masks"], held["margins"][:, margin_t].float()),
        ("logits", fit["masks"], logits(fit), held["masks"], logits(held)),
    ], opts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=["digits", "planted"], default="digits")
    p.add_argument("--config", default=str(ROOT / "configs/digits.yaml"), help="digits: the config of the family")
    p.add_argument("--store", default=None, help="digits: a store holding the config's subset family "
                                                 "(default: a scratch store under bench/out, trained if missing)")
    p.add_argument("--targets", type=int, default=None,
                   help="targets (digits: margin targets, default 200; planted: default 300)")
    p.add_argument("--logit-targets", type=int, default=20, help="digits: targets whose every class's logit is fitted")
    p.add_argument("--models", type=int, default=600, help="planted: models the datamodels are fitted on")
    p.add_argument("--features", type=int, default=1437, help="planted: training points (mask columns)")
    p.add_argument("--heldout", type=int, default=200, help="planted: further models, for the LDS")
    p.add_argument("--n-lambdas", type=int, default=None, help="default: the config's (digits), 20 (planted)")
    p.add_argument("--eps", type=float, default=None, help="default: the config's (digits), 1e-2 (planted)")
    p.add_argument("--val-fraction", type=float, default=None, help="default: the config's (digits), 0.1 (planted)")
    p.add_argument("--min-lambdas", type=int, default=10, help="early stop of the path; 0 = full path")
    p.add_argument("--patience", type=int, default=None,
                   help="the path stops at this many validation-MSE rises in a row (default: the config's (digits), 1)")
    p.add_argument("--tol", type=float, default=None, help="default: the config's (digits), 1e-4 (planted)")
    p.add_argument("--path-tol", type=float, default=None,
                   help="the path's gap, for both fits (default: the config's (digits), tol (planted); 0 = tol)")
    p.add_argument("--max-iter", type=int, default=None, help="default: the config's (digits), 5000 (planted)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 = core for core with sklearn's serial solver (on the shared 2-vCPU VM a "
                        "second thread stalls in every small op whenever other work holds the other core)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--solver", choices=["auto", "cd", "fista"], default="auto",
                   help="ours: compiled coordinate descent (the CPU default) or batched FISTA (torch, any device)")
    p.add_argument("--repeats", type=int, default=3, help="our fit is timed best of this many")
    p.add_argument("--sklearn-repeats", type=int, default=2, help="sklearn's fit is timed best of this many")
    p.add_argument("--sklearn-dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--sklearn-blas-threads", type=int, default=1, help="BLAS threads while sklearn runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sklearn", action="store_true")
    a = p.parse_args()
    if a.workload == "planted":
        defaults = dict(targets=300, n_lambdas=20, eps=1e-2, val_fraction=0.1, tol=1e-4, max_iter=5000, patience=1)
    else:
        defaults = dict(targets=200)
    for key, value in defaults.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    torch.set_num_threads(a.threads)
    runs, opts = workloads(a)
    print(f"{a.workload}: {opts['n_lambdas']} lambdas, eps {opts['eps']}, min_lambdas {a.min_lambdas or 'all'}, "
          f"patience {opts['patience']}, tol {opts['tol']}, path_tol {opts['path_tol'] or opts['tol']}, max_iter {opts['max_iter']}; {a.threads} threads, device {a.device}, solver "
          f"{a.solver}; load average {os.getloadavg()[0]:.1f}")
    failed = []
    for name, fit_m, fit_y, ho_m, ho_y in runs:
        if not compare(name, fit_m, fit_y, ho_m, ho_y, opts, a):
            failed.append(name)
    if failed:
        raise SystemExit(f"LDS differs by more than 0.01 on: {', '.join(failed)}")


def compare(name: str, fit_m, fit_y, ho_m, ho_y, opts: dict, a) -> bool:
    """Time ours and sklearn's on one workload; print per-datamodel times, the ratio and the LDS.
    Returns whether the LDS agree within 0.01."""
    t = fit_y.shape[1]
    print(f"{name}: {fit_m.shape[0]} models x {fit_m.shape[1]} features x {t} datamodels, "
          f"{ho_m.shape[0]} held-out models")
    t0 = time.perf_counter()
    dim = diff_in_means(fit_m, fit_y)
    dim_s = time.perf_counter() - t0
    print(f"  diff_in_means: {dim_s:.2f} s, LDS {lds(dim.weight, dim.bias, ho_m, ho_y).nanmean().item():.3f}")

    dev_m, dev_y = fit_m.to(a.device), fit_y.to(a.device)
    lasso(dev_m[:, :50], dev_y[:, :2], n_lambdas=3, solver=a.solver)  # warm-up: compiled kernels, CUDA init
    times, cpu = [], []
    for _ in range(a.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        dm = lasso(dev_m, dev_y, **opts, solver=a.solver)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    ours_s = min(times)
    ours_lds = lds(dm.weight.cpu(), dm.bias.cpu(), ho_m, ho_y).nanmean().item()
    if a.skip_sklearn:
        print(f"  lasso: ours {1000 * ours_s / t:.2f} ms per datamodel ({ours_s:.2f} s; runs "
              f"{', '.join(f'{x:.2f}' for x in times)}); LDS ours {ours_lds:.3f}")
        return True

    sk_runs = []
    for _ in range(a.sklearn_repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        # sklearn's solver is serial; between its BLAS calls idle BLAS threads spin and slow it ~3x
        with threadpool_limits(a.sklearn_blas_threads):
            sk_dtype = np.dtype(a.sklearn_dtype).type
            sk_w, sk_b, sk_lam = sklearn_lasso(fit_m.numpy(), fit_y.double().numpy(), **opts, dtype=sk_dtype)
        sk_runs.append((time.perf_counter() - t0, time.process_time() - c0))
    sk_s, sk_cpu = min(sk_runs)
    sk_lds = lds(torch.from_numpy(sk_w).double(), torch.from_numpy(sk_b).double(), ho_m, ho_y).nanmean().item()
    dw = (dm.weight.cpu().double() - torch.from_numpy(sk_w).double()).abs().max().item()
    same = np.isclose(dm.lam.cpu().numpy(), sk_lam, rtol=1e-4).mean()
    print(f"  lasso ({name}): ours {1000 * ours_s / t:.2f} ms per datamodel, sklearn {1000 * sk_s / t:.1f} ms, "
          f"ratio {sk_s / ours_s:.1f}x (by CPU time {sk_cpu / cpu[times.index(ours_s)]:.1f}x); "
          f"LDS ours {ours_lds:.3f} sklearn {sk_lds:.3f}")
    if a.task_datamodels and a.device == "cpu":
        design_s, solve_s = design_and_solve_seconds(dev_m, dev_y, opts, a)
        shared_s = solve_s + design_s * t / a.task_datamodels
        print(f"    as in a fit task, the design (split, standardisation, Gram matrices: {design_s:.3f} s) made once "
              f"for its {a.task_datamodels} datamodels (a task's average): ours {1000 * shared_s / t:.2f} ms per datamodel, ratio "
              f"{sk_s / shared_s:.1f}x (this call's design is {design_s / ours_s:.0%} of ours above)")
    print(f"    our runs {', '.join(f'{x:.2f}' for x in times)} s wall, {', '.join(f'{x:.2f}' for x in cpu)} s cpu; "
          f"sklearn {', '.join(f'{x:.1f}' for x, _ in sk_runs)} s wall (best {sk_s:.1f}), {sk_cpu:.1f} s cpu; same lambda on {same:.0%} of datamodels; "
          f"max |weight difference| {dw:.1e}; load average now {os.getloadavg()[0]:.1f}")
    return abs(ours_lds - sk_lds) <= 0.01


def design_and_solve_seconds(fit_m: torch.Tensor, fit_y: torch.Tensor, opts: dict, a) -> tuple[float, float]:
    """Seconds (best of a.repeats) of the design alone (``lasso_design`` and its CPU arrays), and of
    the fit given that design: the two parts of ``lasso`` that a fit task pays once and per datamodel."""
    designs, solves = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        design = lasso_design(fit_m, val_fraction=opts["val_fraction"], seed=opts["seed"])
        if a.solver != "fista":  # the coordinate-descent solver's arrays (the CPU default's)
            design.cd_arrays()
        designs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lasso(fit_m, fit_y, **opts, solver=a.solver, design=design)
        solves.append(time.perf_counter() - t0)
    return min(designs), min(solves)


if __name__ == "__main__":
    main()
