"""LASSO by coordinate descent on working sets, compiled (numba): the CPU solver.

The same problems and the same stopping rule as the batched torch solver in ``estimators`` (which
serves GPUs and designs too large for a Gram matrix): per target, min (1/2m)||yc - X~ theta||^2 +
lam ||theta||_1 on standardised features, written in Gram quantities H = X~' X~ / m and
q = X~' yc / m, solved when sklearn's duality gap over all n features <= tol * ||yc||^2 / m.

One target is solved at a time, serially, so a target's result does not depend on which others
share its call, and calls over disjoint targets run in parallel threads (the kernels release the
GIL). A solve alternates two phases until the gap over all features is small enough:

* a check on all n features, from the full gradient g = H theta - q (kept exact: it changes by a
  row of H per coefficient that moved), which gives the gap and grows the working set by every
  feature the optimality conditions call in (|g_j| > lam). The set only grows along a target's
  path (it holds every support on the way), so each of its features' sub-Gram rows is gathered
  once per path;
* cyclic coordinate descent on the working set alone, over a contiguous copy of its sub-Gram
  matrix, until the working-set problem's gap is half the tolerance (or 50 sweeps have passed). A coordinate that stays at
  zero costs one comparison; one that moves updates the working set's gradients (one row of the
  sub-Gram matrix).

Most solves need one round: warm starts along the path are close, and the set already holds the
features that matter. The cost is then one full-gradient update (support x n) per lambda, plus
sweeps over support x working set.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# sweeps on a working set between two full checks at most: the set's gradients are updated in the
# working dtype, and on long solves (ill-conditioned, tight tol) their float32 drift would otherwise
# let the set's gap pass while the true one does not; each check re-reads them from the exact one
_ROUND_SWEEPS = 50


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
def _add_rows(H, coef, idx, count, out):
    """out += sum_a coef[a] * H[idx[a]] over a < count, skipping zero coefficients."""
    n = out.shape[0]
    for a in range(count):
        c = coef[a]
        if c != 0:
            row = H[idx[a]]
            for k in range(n):
                out[k] += c * row[k]


@numba.njit(cache=True, nogil=True)
def _working_sweeps(G, w, g, theta, q, c0, lam, dual_out, target_gap, budget):
    """Cyclic coordinate descent on a working set of w features: G[:w, :w] its Gram matrix; g, theta,
    q ([:w]) its gradient, coefficients and q, updated in place. dual_out: max |gradient| outside
    the set, so that the gap below is the full problem's if the set holds every feature that
    matters. Sweeps until that gap, checked after each sweep, is <= target_gap, or budget sweeps
    are done; returns the sweeps done."""
    sweeps = 0
    while sweeps < budget:
        for a in range(w):
            h = G[a, a]
            if h <= 0:  # a constant feature: no effect on the fit
                continue
            old = theta[a]
            z = old - g[a] / h
            thr = lam / h
            new = z - thr if z > thr else (z + thr if z < -thr else 0.0)
            theta[a] = new
            d = theta[a] - old  # in theta's dtype, so that the loop below runs in it
            if d != 0:
                row = G[a]
                for b in range(w):
                    g[b] += d * row[b]
        sweeps += 1
        dual_norm, l1, tq, tg = dual_out, 0.0, 0.0, 0.0
        for a in range(w):
            dual_norm = max(dual_norm, abs(g[a]))
            if theta[a] != 0:
                l1 += abs(theta[a])
                tq += theta[a] * q[a]
                tg += theta[a] * g[a]
        if _gap(c0, lam, dual_norm, l1, tq, tg) <= target_gap:
            break
    return sweeps


@numba.njit(cache=True, nogil=True)
def _grow(H, G, idx, old_w, w):
    """Rows and columns old_w..w of the working set's Gram matrix G, for features idx[old_w:w].
    G is (cap, cap) with cap >= the set's size; returns it, reallocated (doubled) when too small."""
    if w > G.shape[0]:
        bigger = np.empty((max(2 * G.shape[0], w), max(2 * G.shape[0], w)), G.dtype)
        bigger[:old_w, :old_w] = G[:old_w, :old_w]
        G = bigger
    for a in range(old_w, w):
        row = H[idx[a]]
        for b in range(w):
            G[a, b] = G[b, a] = row[idx[b]]
    return G


@numba.njit(cache=True, nogil=True)
def _solve(H, q, c0, lam, theta, grad, tol_abs, max_sweeps, idx, pos, G, w):
    """Solve one LASSO problem in place from theta (n,), whose gradient H theta - q is grad (n,).

    The working set is idx[:w] (pos[j] its position of feature j, -1 outside) with Gram matrix
    G[:w, :w]; it holds theta's support on entry, and grows by the features that the optimality
    conditions call in, so that along a path each feature's sub-Gram row is gathered once.
    Returns (sweeps done (at most max_sweeps, sklearn's max_iter), G, w)."""
    n = theta.shape[0]
    g, th, moved, qw = np.empty(n, H.dtype), np.empty(n, H.dtype), np.empty(n, H.dtype), np.empty(n, H.dtype)
    sweeps = 0
    while True:
        gap = _full_gap(q, c0, lam, theta, grad)
        if gap <= tol_abs or sweeps >= max_sweeps:
            return sweeps, G, w
        old_w = w
        dual_out = 0.0
        for j in range(n):
            if pos[j] < 0:
                if abs(grad[j]) > lam:
                    pos[j] = w
                    idx[w] = j
                    w += 1
                else:
                    dual_out = max(dual_out, abs(grad[j]))
        G = _grow(H, G, idx, old_w, w)
        for a in range(w):
            g[a], th[a], qw[a] = grad[idx[a]], theta[idx[a]], q[idx[a]]
            moved[a] = th[a]
        budget = min(max_sweeps - sweeps, _ROUND_SWEEPS)
        sweeps += _working_sweeps(G, w, g, th, qw, c0, lam, dual_out, 0.5 * tol_abs, budget)
        for a in range(w):
            theta[idx[a]] = th[a]
            moved[a] = th[a] - moved[a]
        _add_rows(H, moved, idx, w, grad)


@numba.njit(cache=True, nogil=True)
def _reset(H, G, theta, idx, pos, w):
    """Empty the working set idx[:w], then fill it with theta's support; returns (G, its size)."""
    for a in range(w):
        pos[idx[a]] = -1
    w = 0
    for j in range(theta.shape[0]):
        if theta[j] != 0:
            pos[j] = w
            idx[w] = j
            w += 1
    return _grow(H, G, idx, 0, w), w


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
def _path_step(H, q, c0, lams, j, tol, max_sweeps, path, idx, pos, G, w):
    """Solve at lams[j], warm-started from the path's last two solutions (``_warm_start``, down a
    decreasing path from the third lambda on); returns ``_solve``'s (sweeps, G, w)."""
    theta, before, grad, g_before, start, start_grad = path[0], path[1], path[2], path[3], path[4], path[5]
    slope = 0.0
    if j >= 2 and lams[j - 2] > lams[j - 1] > lams[j]:
        slope = (lams[j] - lams[j - 1]) / (lams[j - 1] - lams[j - 2])
    _warm_start(H, theta, before, grad, g_before, slope, start, start_grad)
    before[:], g_before[:] = theta, grad
    theta[:], grad[:] = start, start_grad
    return _solve(H, q, c0, lams[j], theta, grad, tol * 2 * c0, max_sweeps, idx, pos, G, w)


@numba.njit(cache=True, nogil=True)
def path_targets(H, Q, C0, grid, tol, max_sweeps, lo, hi, out):
    """Solutions at every lambda of grid (k, t) for targets lo..hi, warm-started along each path:
    out[j, i] = theta (n,) of target i at grid[j, i]. Q (t, n), C0 (t,). Returns sweeps (t,)."""
    n = H.shape[0]
    sweeps = np.zeros(hi - lo, np.int64)
    idx, pos, G, w = np.empty(n, np.int64), np.full(n, -1, np.int64), np.empty((64, 64), H.dtype), 0
    path = np.empty((6, n), H.dtype)
    for i in range(lo, hi):
        _path_start(Q[i], path)
        G, w = _reset(H, G, path[0], idx, pos, w)
        for j in range(grid.shape[0]):
            done, G, w = _path_step(H, Q[i], C0[i], grid[:, i], j, tol, max_sweeps, path, idx, pos, G, w)
            sweeps[i - lo] += done
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
    sigma_all / sigma_fit. The path's solutions stop at the relative gap path_tol (they only choose
    lambda), the refit at tol. Writes the refitted theta (all-model standardisation) to out_theta
    (t, n) and the chosen lambda to out_lam (t,); returns the sweeps per target."""
    n = H_fit.shape[0]
    sweeps = np.zeros(hi - lo, np.int64)
    idx, pos, G, w = np.empty(n, np.int64), np.full(n, -1, np.int64), np.empty((64, 64), H_fit.dtype), 0
    path, best = np.empty((6, n), H_fit.dtype), np.empty(n, H_fit.dtype)
    theta, grad = path[0], path[2]
    for i in range(lo, hi):
        _path_start(Q_fit[i], path)
        G, w = _reset(H_fit, G, theta, idx, pos, w)
        best[:] = 0
        best_lam, best_mse, last_mse, rises = grid[0, i], np.inf, np.inf, 0
        for j in range(grid.shape[0]):
            done, G, w = _path_step(H_fit, Q_fit[i], C0_fit[i], grid[:, i], j, path_tol, max_sweeps, path, idx, pos,
                                    G, w)
            sweeps[i - lo] += done
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
        G, w = _reset(H_all, G, theta, idx, pos, w)  # another Gram matrix
        done, G, w = _solve(H_all, Q_all[i], C0_all[i], best_lam, theta, grad, tol * 2 * C0_all[i], max_sweeps,
                            idx, pos, G, w)
        sweeps[i - lo] += done
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
