"""LASSO by batched accelerated proximal gradient (FISTA) in torch: the solver for GPUs and for
designs too large for a Gram matrix (``lasso_cd`` is the CPU one; same problems, same stopping rule).

Targets are rows (theta, q and gradients are (t, n)). Each problem being solved is a row of a
batch and carries only its working set, in (b, K) slots padded with a dummy feature n: the
features of its warm start plus those that the optimality conditions call in (|gradient| > lam).
The gradient theta H - q of such sparse rows needs rows of the Gram matrix H for their nonzeros
only: a weighted sum of rows, i.e. an embedding bag, whose cost follows the nonzeros instead of
n. It comes out on all n features, so every check has sklearn's duality gap over all features
(the stopping rule) and the features to add. Problems stream through the batch: a target that
is done at one lambda leaves its row and comes back at the next one, warm-started, while the
others iterate, so no row waits for stragglers (see ``_solve``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.datamodels.common import Datamodel, Masks
from pipeline.datamodels.lasso_problem import _default_lambdas, _Features, _Targets, _targets, _to_raw


def _slots(mask: Tensor, n: int) -> Tensor:
    """mask (b, n + 1) bool -> (b, K >= 1) the features where it is True, in order, padded with n."""
    counts = mask.sum(1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    return _compact(mask, counts, width, n)


def _compact(mask: Tensor, counts: Tensor, width: int, fill: int) -> Tensor:
    """mask (b, k) bool with counts (b,) = mask.sum(1) <= width -> (b, width) the column indices
    where mask is True, in order, then fill."""
    r, c = mask.nonzero(as_tuple=True)
    pos = r * width + torch.arange(r.numel(), device=mask.device) - (counts.cumsum(0) - counts).index_select(0, r)
    out = torch.full((mask.shape[0] * width,), fill, dtype=torch.long, device=mask.device)
    return out.index_copy_(0, pos, c).view(mask.shape[0], width)


@dataclass(frozen=True, eq=False)
class _Design:
    """Without a Gram matrix, the gradient theta H - q = (X~ theta' - yc)' X~ / m through the design
    itself, one model batch of float masks at a time (``Masks``), so that no (m, n) float array is
    held: the cost is two products per batch. With one batch (m <= the model batch) its standardised
    masks are made once and kept. minus (t, m) = -yc' / m."""

    feat: _Features
    minus: Tensor
    kept: list = field(default_factory=list)

    def gradient(self, theta: Tensor, target: Tensor | None) -> Tensor:
        """theta (b, n) dense -> theta H (b, n + 1), less q of target (b,) when given."""
        b, n = theta.shape
        out = theta.new_zeros(b, n + 1)
        minus = None if target is None else self.minus.index_select(0, target)
        for rows, xs in _scaled(self.feat.X, self.feat.dtype, self.feat.mu, self.feat.scale, self.kept):
            r = (theta @ xs.T).div_(self.feat.m)
            if minus is not None:
                r += minus[:, rows]
            out[:, :n].addmm_(r, xs)
        return out


def _scaled(
    X: Masks, dtype: torch.dtype, shift: Tensor | None, scale: Tensor, kept: list
) -> Iterator[tuple[slice, Tensor]]:
    """(rows, (X - shift) * scale) per model batch of X; with a single batch, made once and kept in kept."""
    if kept:
        yield from kept
        return
    one = len(X.spans()) == 1
    for rows, x in X.batches(dtype):
        x = x if shift is None else x.sub_(shift)
        x.mul_(scale)
        if one:
            kept.append((rows, x))
        yield rows, x


@dataclass(frozen=True)
class _System:
    """The gradients theta H - q of one solve's problems: as embedding bags over table (n + t, n + 1),
    which holds the rows of H and then, at n + target, the row that subtracts the target's q; or,
    without a Gram matrix, through the design (``_Design``). q_pad (t, n + 1) and c0 (t,) per target."""

    n: int
    table: Tensor | None
    design: _Design | None
    q_pad: Tensor
    c0: Tensor


def _system(feat: _Features, tg: _Targets) -> _System:
    gram = feat.rows is not None
    return _System(n=tg.q.shape[1], table=torch.cat([feat.rows, tg.minus]) if gram else None,
                   design=None if gram else _Design(feat, tg.minus),
                   q_pad=torch.nn.functional.pad(tg.q, (0, 1)), c0=tg.c0)


def _times(system: _System, idx: Tensor, vals: Tensor, target: Tensor | None = None) -> Tensor:
    """Rows theta that are vals (b, K) at features idx (b, K) and 0 elsewhere -> theta H (b, n + 1),
    or the gradient theta H - q of the given targets (b,).

    An embedding bag over the nonzero slots (and one bias entry per row): a weighted sum of rows
    of H, so the cost follows the nonzeros; without a Gram matrix, products with the design.
    """
    if system.design is not None:
        return system.design.gradient(_dense(vals, idx, system.n), target)
    if target is not None:  # the bias entry first in each bag, weight 1
        idx = torch.cat([(target + system.n)[:, None], idx], 1)
        vals = torch.cat([vals.new_ones(vals.shape[0], 1), vals], 1)
    nz = vals != 0
    flat = nz.reshape(-1).nonzero().squeeze(1)
    counts = nz.sum(1)
    out = torch.nn.functional.embedding_bag(
        idx.reshape(-1).index_select(0, flat), system.table, counts.cumsum(0) - counts, mode="sum",
        per_sample_weights=vals.reshape(-1).index_select(0, flat),
    )
    return out


def _times_dense(system: _System, theta: Tensor) -> Tensor:
    """theta H (b, n + 1) for dense rows theta (b, n)."""
    n = theta.shape[1]
    idx = _slots(torch.nn.functional.pad(theta != 0, (0, 1)), n)
    return _times(system, idx, torch.gather(torch.nn.functional.pad(theta, (0, 1)), 1, idx))


def _dense(vals: Tensor, idx: Tensor, n: int) -> Tensor:
    """Slot values vals (b, K) at features idx (b, K) (padding n) -> dense rows (b, n)."""
    return vals.new_zeros(vals.shape[0], n + 1).scatter_(1, idx, vals)[:, :n]


def _soft(x: Tensor, thr: Tensor) -> Tensor:
    """Soft-thresholding of x (b, K) by thr (b, 1), in two passes: x - clamp(x, -thr, thr)."""
    return x - torch.clamp(x, -thr, thr)


def _duality_gap(theta: Tensor, g: Tensor, q: Tensor, c0: Tensor, lam: Tensor, dual_norm: Tensor) -> Tensor:
    """Duality gap per row (b,) of (1/2m)||yc - X~ theta||^2 + lam ||theta||_1.

    theta, its gradient g = theta H - q and q: (b, K) on any set of features that holds theta's
    support; dual_norm (b,) = ||g||_inf over all n features (= ||X~' r / m||_inf); c0, lam: (b,).
    sklearn's gap (cd_fast.enet_coordinate_descent) divided by m, written in Gram quantities.
    """
    const = torch.where(dual_norm > lam, lam / dual_norm.clamp_min(1e-30), torch.ones_like(lam))
    tq = torch.linalg.vecdot(theta, q)
    r2 = (2 * c0 - tq + torch.linalg.vecdot(theta, g)).clamp_min(0)  # ||r||^2 / m
    rty = 2 * c0 - tq  # r' yc / m
    return 0.5 * r2 * (1 + const * const) + lam * theta.abs().sum(1) - const * rty


def _momentum_weights(count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """FISTA's extrapolation weights w_k = 1 + (s_k - 1) / s_{k+1}, k < count steps after a
    (re)start, s_0 = 1, s_{k+1} = (1 + sqrt(1 + 4 s_k^2)) / 2: z = theta + (w_k - 1)(theta - theta_prev).
    (w_k -> 2; past count steps the last one is used.)"""
    s = [1.0]
    for _ in range(count):
        s.append((1 + math.sqrt(1 + 4 * s[-1] ** 2)) / 2)
    return torch.tensor([1 + (s[k] - 1) / s[k + 1] for k in range(count)], dtype=dtype, device=device)


@dataclass(frozen=True)
class _Problems:
    """LASSO problems to start: target (r,) whose statistics they use, lam (r,), warm starts
    theta0 (r, n), initial curvature estimates lip (r,), and the gradients there theta0 H - q
    (r, n + 1) if known."""

    target: Tensor
    lam: Tensor
    theta0: Tensor
    lip: Tensor
    grad0: Tensor | None = None


@dataclass
class _Rows:
    """The problems being iterated, one per row, each on its working set of K slots.

    Per row (b,): target, lam, c0 (its problem), lip (curvature estimate), k (steps since the
    momentum restarted), iters (steps done); grad (b, n + 1) the gradient theta H - q on all
    features. Per slot (b, K): idx the feature (n: padding), theta and theta_prev the last two
    iterates, g and g_prev their gradients, and q.
    """

    target: Tensor
    lam: Tensor
    c0: Tensor
    lip: Tensor
    k: Tensor
    iters: Tensor
    grad: Tensor
    idx: Tensor
    theta: Tensor
    theta_prev: Tensor
    g: Tensor
    g_prev: Tensor
    q: Tensor


_ROW_FIELDS = ("target", "lam", "c0", "lip", "k", "iters", "grad")
_SLOT_FIELDS = ("idx", "theta", "theta_prev", "g", "g_prev", "q")


def _rows_start(system: _System, pb: _Problems) -> _Rows:
    """Rows for new problems: working sets = the warm starts' supports, gradients there."""
    pad = torch.nn.functional.pad
    idx = _slots(pad(pb.theta0 != 0, (0, 1)), system.n)
    theta = torch.gather(pad(pb.theta0, (0, 1)), 1, idx)
    grad = _times(system, idx, theta, pb.target) if pb.grad0 is None else pb.grad0.clone()
    g = torch.gather(grad, 1, idx)
    zero = torch.zeros_like(pb.target)
    return _Rows(
        target=pb.target, lam=pb.lam, c0=system.c0.index_select(0, pb.target), lip=pb.lip, k=zero, iters=zero,
        grad=grad, idx=idx, theta=theta, theta_prev=theta, g=g, g_prev=g, q=_slot_q(system, pb.target, idx),
    )


def _slot_q(system: _System, target: Tensor, idx: Tensor) -> Tensor:
    """q of targets (b,) at features idx (b, K) (0 at padding)."""
    flat = target[:, None] * (system.n + 1) + idx
    return system.q_pad.reshape(-1).index_select(0, flat.reshape(-1)).view(idx.shape)


def _rows_take(rows: _Rows, keep: Tensor) -> _Rows:
    """The rows keep (long) of rows."""
    return _Rows(**{f: getattr(rows, f).index_select(0, keep) for f in _ROW_FIELDS + _SLOT_FIELDS})


def _rows_cat(a: _Rows | None, b: _Rows) -> _Rows:
    """Rows of a then b, slots padded to the wider."""
    if a is None:
        return b
    n = a.grad.shape[1] - 1
    width = max(a.idx.shape[1], b.idx.shape[1])

    def pad(x: Tensor, f: str) -> Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=n if f == "idx" else 0)

    fields = {f: torch.cat([getattr(a, f), getattr(b, f)]) for f in _ROW_FIELDS}
    return _Rows(**fields, **{f: torch.cat([pad(getattr(a, f), f), pad(getattr(b, f), f)]) for f in _SLOT_FIELDS})


def _rows_check(system: _System, rows: _Rows, tol: float, max_iter: int) -> Tensor:
    """Done rows (b,) bool: duality gap over all n features <= tol * ||yc||^2 / m, or max_iter
    reached. The others get the features outside their working set whose gradient exceeds lam
    (those a proximal step on all n features would move off zero), with their momentum reset."""
    n = rows.grad.shape[1] - 1
    g_out = rows.grad.scatter_(1, rows.idx, 0)  # the gradient outside the working set (g has the rest)
    out_norm = torch.maximum(g_out.amax(1), g_out.amin(1).neg_())  # (aminmax is 10x slower on CPU)
    dual_norm = torch.maximum(out_norm, rows.g.abs().amax(1))
    gap = _duality_gap(rows.theta, rows.g, rows.q, rows.c0, rows.lam, dual_norm)
    done = (gap <= tol * 2 * rows.c0) | (rows.iters >= max_iter)
    grown = ((out_norm > rows.lam) & ~done).nonzero().squeeze(1)
    if grown.numel():
        part = _slots(g_out.index_select(0, grown).abs_() > rows.lam.index_select(0, grown)[:, None], n)
        new = torch.full((rows.idx.shape[0], part.shape[1]), n, dtype=torch.long, device=part.device)
        new.index_copy_(0, grown, part)
        zeros = rows.theta.new_zeros(new.shape)
        q_new = _slot_q(system, rows.target, new)
        g_new = torch.gather(g_out, 1, new)
        rows.idx = torch.cat([rows.idx, new], 1)
        rows.theta, rows.theta_prev = torch.cat([rows.theta, zeros], 1), torch.cat([rows.theta_prev, zeros], 1)
        rows.g, rows.g_prev = torch.cat([rows.g, g_new], 1), torch.cat([rows.g_prev, g_new], 1)
        rows.q = torch.cat([rows.q, q_new], 1)
        rows.k = rows.k.index_fill(0, grown, 0)
    rows.grad.scatter_(1, rows.idx, rows.g)  # whole again
    _rows_prune(rows)
    return done


def _rows_prune(rows: _Rows) -> None:
    """Drop slots that stay at zero (zero in both iterates, |gradient| <= lam: a proximal step
    leaves them there, and a check brings them back if that changes), when that narrows the
    slots by a third."""
    n = rows.grad.shape[1] - 1
    keep = (rows.theta != 0) | (rows.theta_prev != 0) | (rows.g.abs() > rows.lam[:, None])
    counts = keep.sum(1)
    width = max(int(counts.max()), 1)
    if 3 * width > 2 * rows.idx.shape[1]:
        return
    order = _compact(keep, counts, width, 0)
    real = torch.arange(width, device=counts.device) < counts[:, None]
    for f in _SLOT_FIELDS:
        x = torch.gather(getattr(rows, f), 1, order)
        setattr(rows, f, torch.where(real, x, n if f == "idx" else 0))


def _rows_step(system: _System, rows: _Rows, weights: Tensor) -> None:
    """One FISTA step for every row, in place, with adaptive (gradient) restart.

    weights: ``_momentum_weights``. Each row starts with an optimistic curvature (>= 1, the
    curvature along any single standardised feature) and raises it when a step shows more. The
    check is exact and free for a quadratic: a step d from z descends iff d'Hd <= L d'd, and
    Hd = g(new) - g(z) is known. Raised to 1.2 d'Hd / d'd, L stays below 1.2 times the largest
    eigenvalue of H.
    """
    lip, theta, g = rows.lip, rows.theta, rows.g
    w = weights.index_select(0, rows.k)[:, None]
    z = torch.lerp(rows.theta_prev, theta, w)
    g_z = torch.lerp(rows.g_prev, g, w)  # the gradient is affine: no product for z
    new = _soft(torch.addcmul(z, g_z, (-1 / lip)[:, None]), (rows.lam / lip)[:, None])
    grad = _times(system, rows.idx, new, rows.target)
    g_new = torch.gather(grad, 1, rows.idx)
    d = new - z
    # d'(g_new - g_z) = d'Hd, d'd, and d'(new - theta) < 0: the step turned back (restart)
    curv, dd, turn = (torch.stack([g_new - g_z, d, new - theta], 1) * d[:, None, :]).sum(2).unbind(1)
    bad = curv > lip * dd
    rows.k = torch.where(bad | (turn < 0), 0, (rows.k + 1).clamp_max(weights.shape[0] - 1))
    if bool(bad.any()):  # reject those steps: retry from theta without momentum, with a larger L
        rows.lip = torch.where(bad, 1.2 * curv / dd.clamp_min(1e-30), lip)
        b = bad.nonzero().squeeze(1)
        new.index_copy_(0, b, theta.index_select(0, b))
        g_new.index_copy_(0, b, g.index_select(0, b))
        grad.index_copy_(0, b, rows.grad.index_select(0, b))
    rows.theta_prev, rows.theta, rows.g_prev, rows.g, rows.grad = theta, new, g, g_new, grad
    rows.iters = rows.iters + 1


Advance = Callable[[Tensor, Tensor, Tensor, Tensor], "_Problems | None"]


def _solve(
    system: _System,
    first: _Problems,
    advance: Advance,
    *,
    max_iter: int,
    tol: float,
    check_every: int = 2,
) -> None:
    """Solve min (1/2m)||yc - X~ theta||^2 + lam ||theta||_1 for a stream of problems at once.

    Problems start as ``first``; whenever some are solved, advance(target (r,), theta (r, n),
    gradient theta H - q (r, n + 1), lip (r,)) receives their solutions, gradients and curvature
    estimates and returns the problems that follow (the same targets at their next lambda, say),
    or None. Every row iterates
    FISTA (``_rows_step``) on its working set, which starts as its warm start's support and grows
    at each check by the features the optimality conditions call in; a row is solved when its
    duality gap over all n features <= tol * ||yc||^2 / m (sklearn's criterion; tol is floored at
    10 machine epsilons, below which the gap is rounding noise) and leaves at once, so targets
    advance along their paths independently and no finished row is iterated.
    """
    tol = max(tol, 10 * torch.finfo(first.theta0.dtype).eps)
    weights = _momentum_weights(min(max_iter + check_every + 1, 4096), first.theta0.dtype, first.theta0.device)
    rows: _Rows | None = None
    pending: _Problems | None = first
    while True:
        while pending is not None:  # admit; a warm start that is already a solution goes back
            new = _rows_start(system, pending)
            done = _rows_check(system, new, tol, max_iter)
            pending = _finish(new, done, advance)
            if not bool(done.all()):
                rows = _rows_cat(rows, _rows_take(new, (~done).nonzero().squeeze(1)) if done.any() else new)
        if rows is None or rows.target.numel() == 0:
            return
        for _ in range(check_every):
            _rows_step(system, rows, weights)
        done = _rows_check(system, rows, tol, max_iter)
        if bool(done.any()):
            pending = _finish(rows, done, advance)
            rows = _rows_take(rows, (~done).nonzero().squeeze(1))


def _finish(rows: _Rows, done: Tensor, advance: Advance) -> _Problems | None:
    """Hand the done rows' solutions and gradients to advance; returns what it starts next."""
    if not bool(done.any()):
        return None
    d = done.nonzero().squeeze(1)
    idx, grad = rows.idx.index_select(0, d), rows.grad.index_select(0, d)
    theta = _dense(rows.theta.index_select(0, d), idx, grad.shape[1] - 1)
    return advance(rows.target.index_select(0, d), theta, grad, rows.lip.index_select(0, d))


def _warm_start(
    system: _System, theta: Tensor, theta_old: Tensor, grad: Tensor, grad_old: Tensor, slope: Tensor
) -> tuple[Tensor, Tensor]:
    """Start (r, n) and its gradient theta H - q (r, n + 1) from the last two solutions of each path.

    theta, theta_old (r, n) the solutions at the last two lambdas, grad, grad_old their gradients;
    slope (r,) = (lam_new - lam) / (lam - lam_old). On a fixed support and signs the LASSO
    solution is linear in lambda, so extrapolating the last two solutions is exact there;
    coefficients that are zero or that the line carries across zero start at zero, where the path
    leaves them. The gradient is affine too: extrapolated, less the cut coefficients' share.
    """
    s = slope[:, None]
    pred = torch.addcmul(theta, theta - theta_old, s)
    start = torch.where(pred * theta > 0, pred, torch.zeros_like(pred))
    return start, torch.addcmul(grad, grad - grad_old, s) - _times_dense(system, pred - start)


@dataclass
class _PathState:
    """Per target (t rows): index j (t,) of the lambda being solved; the solutions at j - 1 and
    j - 2 (t, n) and their gradients (t, n + 1), for the next warm start. Starts at theta = 0."""

    j: Tensor
    last: Tensor
    before: Tensor
    g_last: Tensor
    g_before: Tensor

    @staticmethod
    def new(system: _System) -> _PathState:
        t, n = system.q_pad.shape[0], system.n
        zeros = system.q_pad.new_zeros(t, n)
        j = torch.zeros(t, dtype=torch.long, device=zeros.device)
        return _PathState(j, zeros, zeros.clone(), -system.q_pad, -system.q_pad)

    def first(self, grid: Tensor) -> _Problems:
        """Every target at the first lambda, from theta = 0."""
        target = torch.arange(self.j.shape[0], device=grid.device)
        return _Problems(target=target, lam=grid[0], theta0=self.last.clone(), lip=torch.ones_like(grid[0]),
                         grad0=self.g_last)

    def solved(self, target: Tensor, theta: Tensor, grad: Tensor) -> None:
        self.before.index_copy_(0, target, self.last.index_select(0, target))
        self.last.index_copy_(0, target, theta)
        self.g_before.index_copy_(0, target, self.g_last.index_select(0, target))
        self.g_last.index_copy_(0, target, grad)

    def next(self, system: _System, grid: Tensor, target: Tensor, lip: Tensor) -> _Problems:
        """Move targets (r,) to their next lambda of grid (k, t): the problems there, warm-started."""
        j = self.j.index_select(0, target) + 1
        self.j.index_copy_(0, target, j)
        lam, lam1, lam2 = _at(grid, j, target), _at(grid, j - 1, target), _at(grid, (j - 2).clamp_min(0), target)
        down = (j >= 2) & (lam2 > lam1) & (lam1 > lam)  # extrapolate only down a decreasing path
        slope = torch.where(down, (lam - lam1) / torch.where(down, lam1 - lam2, -1), torch.zeros_like(lam))
        rows = (self.last, self.before, self.g_last, self.g_before)
        start, grad = _warm_start(system, *(x.index_select(0, target) for x in rows), slope)
        return _Problems(target=target, lam=lam, theta0=start, lip=lip, grad0=grad)


def _at(grid: Tensor, j: Tensor, target: Tensor) -> Tensor:
    """grid[j, target] for a contiguous grid (k, t) and indices j, target (r,)."""
    return grid.reshape(-1).index_select(0, j * grid.shape[1] + target)


def _path(feat: _Features, tg: _Targets, grid: Tensor, *, max_iter: int, tol: float) -> Tensor:
    """theta (k, t, n) in standardised units at every lambda of grid (k, t), warm-started."""
    grid = grid.contiguous()
    k, t = grid.shape
    thetas = tg.q.new_zeros(k, t, tg.q.shape[1])
    system = _system(feat, tg)
    state = _PathState.new(system)

    def advance(target: Tensor, theta: Tensor, grad: Tensor, lip: Tensor) -> _Problems | None:
        j = state.j.index_select(0, target)
        thetas.view(k * t, -1).index_copy_(0, j * t + target, theta)
        state.solved(target, theta, grad)
        go = (j + 1 < k).nonzero().squeeze(1)
        return state.next(system, grid, target.index_select(0, go), lip.index_select(0, go)) if go.numel() else None

    _solve(system, state.first(grid), advance, max_iter=max_iter, tol=tol)
    return thetas


def _select_and_refit(
    fit_feat: _Features,
    all_feat: _Features,
    val: Masks,
    Y_fit: Tensor,
    Y_val: Tensor,
    Y_all: Tensor,
    *,
    n_lambdas: int,
    eps: float,
    min_lambdas: int | None,
    max_iter: int,
    tol: float,
    path_tol: float | None = None,
    patience: int = 1,
) -> Datamodel:
    """Path on the fitting models, lambda per target by validation MSE, refit on all models.

    Each target walks its own path: when its solve at one lambda is done, its validation MSE is
    scored and it starts the next lambda (or stops) while the other targets are still iterating.
    """
    tg = _targets(fit_feat, Y_fit)
    grid = _default_lambdas(tg, n_lambdas, eps)
    k, t = grid.shape
    system = _system(fit_feat, tg)
    state = _PathState.new(system)
    best_theta = torch.zeros_like(tg.q)  # in the fitting models' standardisation
    best_lam = grid[0].clone()
    best_mse = torch.full_like(tg.c0, math.inf)
    last_mse = torch.full_like(tg.c0, math.inf)
    rises = torch.zeros_like(tg.c0, dtype=torch.long)  # rises in a row of each target's validation MSE
    end_lip = torch.ones_like(tg.c0)
    y_val, inv_sigma, kept = Y_val.T, 1 / fit_feat.sigma, []  # raw weight = theta / sigma
    mu_s = fit_feat.mu / fit_feat.sigma

    def advance(target: Tensor, theta: Tensor, grad: Tensor, lip: Tensor) -> _Problems | None:
        j = state.j.index_select(0, target)
        bias = tg.ybar.index_select(0, target) - theta @ mu_s
        pred = torch.cat([theta @ x.T for _, x in _scaled(val, fit_feat.dtype, None, inv_sigma, kept)], 1)
        mse = ((y_val.index_select(0, target) - bias[:, None] - pred) ** 2).mean(1)
        better = (mse < best_mse.index_select(0, target)).nonzero().squeeze(1)  # strict: ties keep
        won = target.index_select(0, better)  # the larger lambda (sparser model)
        best_mse.index_copy_(0, won, mse.index_select(0, better))
        best_lam.index_copy_(0, won, _at(grid, j.index_select(0, better), won))
        best_theta.index_copy_(0, won, theta.index_select(0, better))
        stop = j + 1 >= k
        rose = (rises.index_select(0, target) + 1) * (mse > last_mse.index_select(0, target))
        rises.index_copy_(0, target, rose)
        if min_lambdas is not None:  # fast_l1's rule (patience 1): after min_lambdas, stop at the first rise
            stop |= (j + 1 >= min_lambdas) & (rose >= patience)
        last_mse.index_copy_(0, target, mse)
        state.solved(target, theta, grad)
        end_lip.index_copy_(0, target, lip)
        go = (~stop).nonzero().squeeze(1)
        return state.next(system, grid, target.index_select(0, go), lip.index_select(0, go)) if go.numel() else None

    _solve(system, state.first(grid), advance, max_iter=max_iter, tol=tol if path_tol is None else path_tol)

    all_tg = _targets(all_feat, Y_all)
    theta = torch.zeros_like(all_tg.q)

    def keep(target: Tensor, th: Tensor, grad: Tensor, lip: Tensor) -> None:
        theta.index_copy_(0, target, th)

    # warm start: the selected path solution, re-expressed in the all-model standardisation
    start = best_theta * (all_feat.sigma / fit_feat.sigma)
    refit = _Problems(torch.arange(t, device=grid.device), best_lam, start, end_lip)
    _solve(_system(all_feat, all_tg), refit, keep, max_iter=max_iter, tol=tol)
    weight, bias = _to_raw(all_feat, all_tg, theta)
    return Datamodel(weight=weight, bias=bias, lam=best_lam)
