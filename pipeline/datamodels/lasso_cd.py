"""LASSO by coordinate descent with covariance updates, compiled (numba): the CPU solver.

The same problems and the same stopping rule as the batched torch solver in ``lasso_fista`` (which
serves GPUs and designs too large for a Gram matrix): per target, min (1/2m)||yc - X~ theta||^2 +
lam ||theta||_1 on standardised features, written in Gram quantities H = X~' X~ / m and
q = X~' yc / m, solved when sklearn's duality gap over all n features <= tol * ||yc||^2 / m (for
the solutions returned, on the gradient recomputed from theta: see ``_solve``).

One target is solved at a time, serially, so a target's result does not depend on which others
share its call, and calls over disjoint targets run in parallel threads (the kernels release the
GIL). A solve keeps the gradient g = H theta - q of every feature up to date (glmnet's covariance
updates): cyclic sweeps over all n features, in which a coefficient at zero whose |g_j| <= lam stays
there at the cost of one comparison, and one that moves adds its row of H (contiguous, n values) to
g; after each sweep the gap over all features comes from g in one pass over n.

Why not working sets with their own sub-Gram matrix (this module's earlier design): on the digits
default's real targets (supports of 100-400 of 1,437 features), gathering each entering feature's
entries from a cold row of H and the full-gradient refresh after each round cost more than the full
rows saved; this is 1.3-1.4x faster there (``bench/fit_speed.py``, RESULTS.md).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# sweeps between two recomputations of the gradient from theta's support: it is updated in the
# working dtype, and on long solves (ill-conditioned, tight tol) its float32 drift would otherwise
# let the gap pass, or never pass, on a gradient that is no longer H theta - q
_REFRESH_SWEEPS = 50


@numba.njit(cache=True, nogil=True)
def _gap(c0, lam, dual_norm, l1, tq, tg):
    """sklearn's duality gap divided by m from Gram quantities: theta'q (tq), theta'g (tg), ||theta||_1
    (l1), ||g||_inf over all features (dual_norm), c0 = ||yc||^2 / 2m."""
    const = lam / dual_norm if dual_norm > lam else 1.0
    r2 = max(2 * c0 - tq + tg, 0.0)  # ||r||^2 / m
    return 0.5 * r2 * (1 + const * const) + lam * l1 - const * (2 * c0 - tq)


@numba.njit(cache=True, nogil=True)
def _full_gap(q, c0, lam, theta, grad):
    """The duality gap over all n features of theta with gradient grad = H theta - q."""
    dual_norm = l1 = tq = tg = 0.0
    for j in range(theta.shape[0]):
        a = abs(grad[j])
        if a > dual_norm:
            dual_norm = a
        if theta[j] != 0:
            l1 += abs(theta[j])
            tq += theta[j] * q[j]
            tg += theta[j] * grad[j]
    return _gap(c0, lam, dual_norm, l1, tq, tg)


@numba.njit(cache=True, nogil=True)
def _sweep(H, lam, theta, grad):
    """One cyclic pass of coordinate descent over all features, in place; grad = H theta - q is kept
    up to date by the row of H of each coefficient that moves."""
    n = grad.shape[0]
    for j in range(n):
        old = theta[j]
        if old == 0 and abs(grad[j]) <= lam:
            continue
        h = H[j, j]
        if h <= 0:  # a constant feature: no effect on the fit (its row of H is zero: grad stays)
            theta[j] = 0
            continue
        z = old - grad[j] / h
        thr = lam / h
        theta[j] = z - thr if z > thr else (z + thr if z < -thr else 0.0)
        d = theta[j] - old  # in theta's dtype, so that the loop below runs in it
        if d != 0:
            row = H[j]
            for k in range(n):
                grad[k] += d * row[k]


@numba.njit(cache=True, nogil=True)
def _solve(H, q, c0, lam, theta, grad, tol_abs, max_sweeps, exact_exit):
    """Solve one LASSO problem in place from theta (n,), whose gradient H theta - q is grad (n,):
    sweeps until the duality gap over all features is <= tol_abs. Returns the sweeps done (at most
    max_sweeps, sklearn's max_iter).

    The gap comes from the gradient kept by the sweeps, which drifts in float32 (most on designs with
    fewer models than points, over long warm-started paths). exact_exit: when that gap passes, the
    gradient is recomputed from theta's support and the gap checked again (sweeping on if it fails),
    so that a solution that is returned meets tol on H theta - q itself; one more pass over the
    support's rows. Path solutions that only choose lambda go without it."""
    sweeps = 0
    while True:
        while _full_gap(q, c0, lam, theta, grad) > tol_abs and sweeps < max_sweeps:
            _sweep(H, lam, theta, grad)
            sweeps += 1
            if sweeps % _REFRESH_SWEEPS == 0:
                _start_gradient(H, q, theta, grad)
        if not exact_exit or sweeps >= max_sweeps or (sweeps > 0 and sweeps % _REFRESH_SWEEPS == 0):
            return sweeps  # (a refresh just made grad exact, or the budget is spent)
        _start_gradient(H, q, theta, grad)
        if _full_gap(q, c0, lam, theta, grad) <= tol_abs:
            return sweeps


@numba.njit(cache=True, nogil=True)
def _start_gradient(H, q, theta, grad):
    """grad = H theta - q, from theta's support."""
    grad[:] = -q
    for j in range(theta.shape[0]):
        if theta[j] != 0:
            c = theta[j]
            row = H[j]
            for k in range(grad.shape[0]):
                grad[k] += c * row[k]


@numba.njit(cache=True, nogil=True)
def _warm_start(H, theta, theta_old, grad, grad_old, slope, start, start_grad):
    """The next lambda's start (and its gradient) from the last two solutions of a path.

    On a fixed support and signs the solution is linear in lambda, so extrapolating by slope =
    (lam_new - lam) / (lam - lam_old) is exact there; coefficients that are zero or that the line
    carries across zero start at zero. The gradient is affine: extrapolated, less the cut
    coefficients' rows of H."""
    n = theta.shape[0]
    for j in range(n):
        start_grad[j] = grad[j] + slope * (grad[j] - grad_old[j])
    for j in range(n):
        start[j] = theta[j] + slope * (theta[j] - theta_old[j])
        if start[j] * theta[j] <= 0 and start[j] != 0:
            cut = start[j]  # in theta's dtype, so that the loop below runs in it
            start[j] = 0
            row = H[j]
            for k in range(n):
                start_grad[k] -= cut * row[k]


@numba.njit(cache=True, nogil=True)
def _path_start(q, path):
    """A path's state (6, n) at theta = 0: theta, the solution before it, their gradients
    H theta - q, and room for the next start and its gradient."""
    path[:] = 0
    path[2] = -q
    path[3] = -q


@numba.njit(cache=True, nogil=True)
def _path_step(H, q, c0, lams, j, tol, max_sweeps, path, exact_exit):
    """Solve at lams[j], warm-started from the path's last two solutions (``_warm_start``, down a
    decreasing path from the third lambda on); returns the sweeps done."""
    theta, before, grad, g_before, start, start_grad = path[0], path[1], path[2], path[3], path[4], path[5]
    slope = 0.0
    if j >= 2 and lams[j - 2] > lams[j - 1] > lams[j]:
        slope = (lams[j] - lams[j - 1]) / (lams[j - 1] - lams[j - 2])
    _warm_start(H, theta, before, grad, g_before, slope, start, start_grad)
    before[:], g_before[:] = theta, grad
    theta[:], grad[:] = start, start_grad
    return _solve(H, q, c0, lams[j], theta, grad, tol * 2 * c0, max_sweeps, exact_exit)


@numba.njit(cache=True, nogil=True)
def path_targets(H, Q, C0, grid, tol, max_sweeps, lo, hi, out):
    """Solutions at every lambda of grid (k, t) for targets lo..hi, warm-started along each path:
    out[j, i] = theta (n,) of target i at grid[j, i]. Q (t, n), C0 (t,). Returns sweeps (t,)."""
    sweeps = np.zeros(hi - lo, np.int64)
    path = np.empty((6, H.shape[0]), H.dtype)
    for i in range(lo, hi):
        _path_start(Q[i], path)
        for j in range(grid.shape[0]):
            sweeps[i - lo] += _path_step(H, Q[i], C0[i], grid[:, i], j, tol, max_sweeps, path, True)
            out[j, i] = path[0]
    return sweeps


@numba.njit(cache=True, nogil=True)
def _validation_mse(theta, xv_t, yv):
    """Mean squared error of the predictions xv_t' theta (xv_t (n, v)) against yv (v,)."""
    pred = np.zeros(xv_t.shape[1])
    for f in range(theta.shape[0]):
        if theta[f] != 0:
            c = theta[f]
            for r in range(pred.shape[0]):
                pred[r] += c * xv_t[f, r]
    return np.mean((yv - pred) ** 2)


@numba.njit(cache=True, nogil=True)
def select_refit_targets(H_fit, Q_fit, C0_fit, grid, xv_t, yv, min_lambdas, patience, H_all, Q_all, C0_all,
                         ratio, tol, path_tol, max_sweeps, lo, hi, out_theta, out_lam):
    """Per target lo..hi: the path on the fitting models, lambda by validation MSE, refit on all.

    grid (k, t) the fitting path; xv_t (n, v) the validation models' standardised design (fitting
    standardisation), transposed; yv (v, t) their outputs less the fitting mean; min_lambdas: after
    that many lambdas a path stops at the patience-th rise in a row of its validation MSE (-1: never;
    patience 1 is fast_l1's first rise). The refit starts from the chosen solution times ratio (n,) =
    sigma_all / sigma_fit. The path's solutions stop at the relative gap path_tol on the kept gradient
    (they only choose lambda), the refit at tol on the exact one (``_solve``'s exact_exit). Writes the
    refitted theta (all-model standardisation) to out_theta (t, n) and the chosen lambda to out_lam
    (t,); returns the sweeps per target."""
    n = H_fit.shape[0]
    sweeps = np.zeros(hi - lo, np.int64)
    path, best = np.empty((6, n), H_fit.dtype), np.empty(n, H_fit.dtype)
    theta, grad = path[0], path[2]
    for i in range(lo, hi):
        _path_start(Q_fit[i], path)
        best[:] = 0
        best_lam, best_mse, last_mse, rises = grid[0, i], np.inf, np.inf, 0
        for j in range(grid.shape[0]):
            sweeps[i - lo] += _path_step(H_fit, Q_fit[i], C0_fit[i], grid[:, i], j, path_tol, max_sweeps, path,
                                         False)
            mse = _validation_mse(theta, xv_t, yv[:, i])
            if mse < best_mse:  # strict: ties keep the larger lambda (the sparser model)
                best_mse, best_lam = mse, grid[j, i]
                best[:] = theta
            rises = rises + 1 if mse > last_mse else 0
            if min_lambdas >= 0 and j + 1 >= min_lambdas and rises >= patience:
                break
            last_mse = mse
        theta[:] = best * ratio
        _start_gradient(H_all, Q_all[i], theta, grad)
        sweeps[i - lo] += _solve(H_all, Q_all[i], C0_all[i], best_lam, theta, grad, tol * 2 * C0_all[i], max_sweeps,
                                 True)
        out_theta[i] = theta
        out_lam[i] = best_lam
    return sweeps


def over_targets(run, t: int, threads: int) -> np.ndarray:
    """run(lo, hi) -> sweeps (hi - lo,) over targets 0..t, in one contiguous part per thread (the
    kernels release the GIL and write disjoint rows). Returns the sweeps (t,)."""
    size = max(-(-t // max(threads, 1)), 1)
    parts = [(lo, min(lo + size, t)) for lo in range(0, t, size)]
    if len(parts) <= 1:
        return run(0, t)
    with ThreadPoolExecutor(len(parts)) as pool:
        return np.concatenate(list(pool.map(lambda part: run(*part), parts)))
