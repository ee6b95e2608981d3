"""Datamodel estimators: closed forms by hand, ridge and LASSO against sklearn, recovery of a planted
linear model, and the linear datamodeling score against scipy."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.linear_model import Lasso, Ridge
from sklearn.preprocessing import StandardScaler

from pipeline.datamodels import ESTIMATORS, Datamodel, diff_in_means, get_estimator, lasso, lasso_path, lds, ridge


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are small: a second thread only adds synchronisation, badly so on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(models: int, points: int = 100, targets: int = 4, *, active: int = 10, noise: float = 0.3, seed: int = 0):
    """Bernoulli(1/2) masks (models, points), y = b + mask @ w_true + noise; w_true (points, targets) sparse."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(models, points, generator=g) < 0.5
    w = torch.zeros(points, targets)
    for j in range(targets):
        w[torch.randperm(points, generator=g)[:active], j] = torch.randn(active, generator=g)
    b = torch.randn(targets, generator=g)
    return masks, b + masks.float() @ w + noise * torch.randn(models, targets, generator=g), w


# the LASSO solvers: compiled coordinate descent (the CPU default) and batched FISTA (any device)
SOLVERS = ["cd", "fista"]


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.flatten().double().numpy(), b.flatten().double().numpy())[0, 1])


def test_registry_names_and_unknown():
    assert set(ESTIMATORS) == {"diff_in_means", "lasso", "ridge"}
    assert get_estimator("ridge") is ridge
    with pytest.raises(ValueError, match="diff_in_means, lasso, ridge"):
        get_estimator("ols")


def test_diff_in_means_by_hand():
    # point 0 in models {0, 1}, point 1 in {1, 2}, point 2 in all of them (no contrast: weight 0)
    masks = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    outputs = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0], [0.0, 5.0]])
    dm = diff_in_means(masks, outputs)
    # target 0: point 0: (1+3)/2 - (2+0)/2 = 1; point 1: (3+2)/2 - (1+0)/2 = 2; a constant target: 0
    torch.testing.assert_close(dm.weight, torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]))
    # bias centres the predictions: mean(y) - mean(mask) @ w = 1.5 - (0.5 * 1 + 0.5 * 2) = 0
    torch.testing.assert_close(dm.bias, torch.tensor([0.0, 5.0]))
    torch.testing.assert_close(dm.predict(masks).mean(0), outputs.mean(0))
    assert dm.lam is None
    torch.testing.assert_close(diff_in_means(masks, outputs, target_chunk=1).weight, dm.weight)


@pytest.mark.parametrize("models,points", [(60, 20), (15, 30)])  # primal and dual (fewer models) forms
def test_ridge_matches_sklearn(models, points):
    masks, outputs, _ = planted(models, points, 3)
    sk = Ridge(alpha=2.5).fit(masks.double().numpy(), outputs.double().numpy())
    for dtype, atol in [(torch.float64, 1e-9), (torch.float32, 1e-4)]:
        dm = ridge(masks, outputs, lam=2.5, dtype=dtype)
        np.testing.assert_allclose(dm.weight.double().numpy(), sk.coef_.T, atol=atol)
        np.testing.assert_allclose(dm.bias.double().numpy(), sk.intercept_, atol=atol)
        assert dm.weight.dtype == dtype and dm.lam.shape == (3,)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_fixed_lambda_matches_sklearn(solver):
    masks, outputs, _ = planted(200, 60, 3)
    lams = torch.tensor([0.1, 0.02])
    x = masks.double().numpy()
    scaler = StandardScaler().fit(x)  # population std, as ours
    xs = scaler.transform(x)
    for dtype, tol, atol in [(torch.float64, 1e-12, 1e-6), (torch.float32, 1e-7, 1e-3)]:
        path = lasso_path(masks, outputs, lambdas=lams, tol=tol, max_iter=20000, dtype=dtype, solver=solver)
        assert path.weight.shape == (2, 60, 3) and path.lambdas.shape == (2, 3)
        for k, lam in enumerate(lams.tolist()):
            for j in range(3):
                sk = Lasso(alpha=lam, tol=1e-12, max_iter=100000).fit(xs, outputs[:, j].double().numpy())
                w, b = path.weight[k, :, j].double().numpy(), path.bias[k, j].item()
                # standardised units: theta = w_raw * sigma
                np.testing.assert_allclose(w * scaler.scale_, sk.coef_, atol=atol)
                # raw inclusion units: the same predictions on raw masks
                np.testing.assert_allclose(b + x @ w, sk.predict(xs), atol=10 * atol)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_per_target_lambdas_and_degenerate_columns(solver):
    masks, outputs, _ = planted(150, 30, 3)
    masks[:, 0] = True  # a point in every model: no information, weight 0
    outputs[:, 2] = 4.0  # a constant target: all-zero model, bias = the constant
    lams = torch.tensor([[0.2, 0.05, 0.1]])
    path = lasso_path(masks, outputs, lambdas=lams, tol=1e-8, solver=solver)
    for j in range(2):
        alone = lasso_path(masks, outputs[:, j : j + 1], lambdas=lams[:, j], tol=1e-8, solver=solver)
        torch.testing.assert_close(path.weight[0, :, j], alone.weight[0, :, 0], atol=1e-4, rtol=0)
    assert (path.weight[0, 0] == 0).all() and (path.weight[0, :, 2] == 0).all()
    torch.testing.assert_close(path.bias[0, 2], torch.tensor(4.0))
    dm = lasso(masks, outputs, n_lambdas=8, solver=solver)
    assert (dm.weight[:, 2] == 0).all() and torch.isfinite(dm.weight).all()


def _sk_gap(x: np.ndarray, y: np.ndarray, theta: np.ndarray, lam: float) -> float:
    """sklearn's duality gap (cd_fast) of (1/2m)||yc - x theta||^2 + lam ||theta||_1, divided by m."""
    m = x.shape[0]
    yc = y - y.mean()
    r = yc - x @ theta
    dual_norm = np.abs(x.T @ r).max() / m
    const = min(1.0, lam / dual_norm) if dual_norm > 0 else 1.0
    return (0.5 * (r @ r) * (1 + const**2) / m + lam * np.abs(theta).sum() - const * (r @ yc) / m)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_stops_on_the_gap_over_all_features(solver):
    # FISTA iterates on working sets and CD sweeps skip features at zero; the stopping rule must
    # still be sklearn's gap over all n
    masks, outputs, _ = planted(120, 200, 5, active=15, noise=0.5, seed=4)
    x = masks.double().numpy()
    xs = StandardScaler().fit_transform(x)
    lams = torch.tensor([0.2, 0.08, 0.03, 0.01])
    for tol in (1e-3, 1e-6):
        path = lasso_path(masks, outputs, lambdas=lams, tol=tol, dtype=torch.float64, solver=solver)
        for k in range(4):
            for j in range(5):
                y = outputs[:, j].double().numpy()
                theta = path.weight[k, :, j].numpy() * x.std(0)
                yc = y - y.mean()
                assert _sk_gap(xs, y, theta, lams[k].item()) <= tol * (yc @ yc) / len(y) * (1 + 1e-9)


def test_lasso_working_set_never_drops_an_active_feature():
    # From an empty start at a small lambda every feature must enter through the working-set
    # checks; from a start spread over every feature most must leave. Both reach sklearn's exact
    # support and weights, so no feature active in the exact solution is ever left out.
    from pipeline.datamodels import lasso_fista, lasso_problem

    masks, outputs, _ = planted(150, 80, 3, active=12, noise=0.3, seed=5)
    x = masks.double().numpy()
    xs = StandardScaler().fit_transform(x)
    lam = 0.01
    feat = lasso_problem._features(masks.double())
    tg = lasso_problem._targets(feat, outputs.double())
    g = torch.Generator().manual_seed(0)
    for theta0 in (torch.zeros(3, 80, dtype=torch.float64), torch.randn(3, 80, generator=g, dtype=torch.float64)):
        got = {}

        def keep(target, theta, grad, lip):
            # the gradient handed over is theta H - q on all features (checks zero part of it)
            exact = theta @ feat.rows[:, :80] - tg.q[target]
            torch.testing.assert_close(grad, torch.nn.functional.pad(exact, (0, 1)))
            for j, th in zip(target.tolist(), theta):
                got[j] = th

        first = lasso_fista._Problems(torch.arange(3), torch.full((3,), lam, dtype=torch.float64), theta0,
                              torch.ones(3, dtype=torch.float64))
        lasso_fista._solve(lasso_fista._system(feat, tg), first, keep, max_iter=20000, tol=1e-12)
        for j in range(3):
            sk = Lasso(alpha=lam, tol=1e-12, max_iter=100000).fit(xs, outputs[:, j].double().numpy())
            active = np.abs(sk.coef_) > 1e-8
            assert active.sum() > 20  # a real working-set problem: many features enter
            ours = got[j].numpy()
            assert (ours[active] != 0).all()
            np.testing.assert_allclose(ours, sk.coef_, atol=1e-6)


def test_lasso_rows_keep_their_gradients_exact():
    # through steps, checks (which add and drop working-set features) and rejected steps, every
    # row's state stays consistent: grad = theta H - q on all features, g and q its slots' values
    from pipeline.datamodels import lasso_fista, lasso_problem

    masks, outputs, _ = planted(60, 90, 6, active=12, noise=0.5, seed=6)  # fewer models than points
    feat = lasso_problem._features(masks.double())
    tg = lasso_problem._targets(feat, outputs.double())
    system = lasso_fista._system(feat, tg)
    g = torch.Generator().manual_seed(2)
    theta0 = torch.randn(6, 90, generator=g, dtype=torch.float64) * (torch.rand(6, 90, generator=g) < 0.2)
    lam = 0.3 * tg.q.abs().amax(1)
    rows = lasso_fista._rows_start(system, lasso_fista._Problems(torch.arange(6), lam, theta0, torch.ones(6, dtype=torch.float64)))
    weights = lasso_fista._momentum_weights(100, torch.float64, "cpu")
    widths = set()
    for it in range(60):
        if it % 2 == 0:
            lasso_fista._rows_check(system, rows, 1e-12, 10**6)
        else:
            lasso_fista._rows_step(system, rows, weights)
        widths.add(rows.idx.shape[1])
        theta = lasso_fista._dense(rows.theta, rows.idx, 90)
        exact = torch.nn.functional.pad(theta @ feat.rows[:, :90] - tg.q[rows.target], (0, 1))
        torch.testing.assert_close(rows.grad, exact)
        torch.testing.assert_close(rows.g, torch.gather(exact, 1, rows.idx))
        torch.testing.assert_close(rows.q, torch.gather(torch.nn.functional.pad(tg.q, (0, 1)), 1, rows.idx))
    assert len(widths) > 2  # the working sets grew and were pruned


def test_lasso_design_route_matches_gram_route(monkeypatch):
    # beyond GRAM_MAX_FEATURES products go through X~ instead of an n x n Gram matrix
    from pipeline.datamodels import lasso_problem

    masks, outputs, _ = planted(200, 60, 4)
    gram_path = lasso_path(masks, outputs, n_lambdas=6, tol=1e-10, dtype=torch.float64)
    gram_fit = lasso(masks, outputs, n_lambdas=8, tol=1e-10, dtype=torch.float64)
    monkeypatch.setattr(lasso_problem, "GRAM_MAX_FEATURES", 10)
    assert lasso_problem._features(masks.double()).rows is None
    design_path = lasso_path(masks, outputs, n_lambdas=6, tol=1e-10, dtype=torch.float64)
    design_fit = lasso(masks, outputs, n_lambdas=8, tol=1e-10, dtype=torch.float64)
    torch.testing.assert_close(design_path.weight, gram_path.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(design_fit.weight, gram_fit.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(design_fit.lam, gram_fit.lam)


def test_features_from_moments():
    # the Gram matrix from raw moments equals the standardised design's, a constant column gives a
    # zero row and column, and moments of stacked designs add up (the refit's design)
    from pipeline.datamodels import lasso_problem

    masks, outputs, _ = planted(90, 30, 2)
    masks[:, 3] = True
    X = masks.double()
    feat = lasso_problem._features(X)
    mu, sd = X.mean(0), X.std(0, correction=0)
    sd[3] = 1
    xs = (X - mu) / sd
    torch.testing.assert_close(feat.rows[:, :30], xs.T @ xs / 90)
    assert (feat.rows[:, 30] == 0).all() and (feat.rows[3] == 0).all() and (feat.rows[:, 3] == 0).all()
    torch.testing.assert_close(feat.sigma, sd)
    top, bottom = lasso_problem._moments(X[:50]), lasso_problem._moments(X[50:])
    stacked = lasso_problem._features(X, (top[0] + bottom[0], top[1] + bottom[1]))
    torch.testing.assert_close(stacked.rows, feat.rows)
    tg = lasso_problem._targets(feat, outputs.double())
    torch.testing.assert_close(tg.q, (outputs.double() - outputs.double().mean(0)).T @ xs / 90)


def test_lasso_warm_start_product_is_exact():
    from pipeline.datamodels import lasso_fista, lasso_problem

    # the next lambda's start and its gradient theta H - q, extrapolated from the last two solutions
    masks, outputs, _ = planted(100, 40, 3)
    feat = lasso_problem._features(masks.double())
    tg = lasso_problem._targets(feat, outputs.double())
    system = lasso_fista._system(feat, tg)
    g = torch.Generator().manual_seed(1)
    theta_old = torch.randn(3, 40, generator=g, dtype=torch.float64) * (torch.rand(3, 40, generator=g) < 0.3)
    theta = theta_old + 0.5 * torch.randn(3, 40, generator=g, dtype=torch.float64) * (theta_old != 0)
    theta[:, :4] = 0.1  # a few coefficients entering

    def gradient(th):
        return torch.nn.functional.pad(th @ feat.rows[:, :40] - tg.q, (0, 1))

    slope = torch.tensor([0.3, 1.0, 2.0]).double()
    start, start_grad = lasso_fista._warm_start(system, theta, theta_old, gradient(theta), gradient(theta_old), slope)
    assert ((start == 0) | (start * theta > 0)).all() and (start != 0).any() and (start != theta).any()
    torch.testing.assert_close(start_grad, gradient(start))
    idx = lasso_fista._slots(torch.nn.functional.pad(start != 0, (0, 1)), 40)
    vals = torch.gather(torch.nn.functional.pad(start, (0, 1)), 1, idx)
    torch.testing.assert_close(lasso_fista._times(system, idx, vals, torch.arange(3)), gradient(start))


def test_lasso_cd_solve_from_any_start_keeps_its_gradient_exact():
    # the compiled solver from an empty start and from one spread over every feature (most must
    # leave): sklearn's weights, and the full gradient it keeps up to date by rows of H is H theta - q
    # on exit, also across its periodic recomputations (a solve this tight takes more than 50 sweeps)
    from pipeline.datamodels import lasso_fit, lasso_problem
    from pipeline.datamodels import lasso_cd

    masks, outputs, _ = planted(150, 80, 2, active=12, noise=0.3, seed=5)
    xs = StandardScaler().fit_transform(masks.double().numpy())
    feat = lasso_problem._features(masks.double())
    tg = lasso_problem._targets(feat, outputs.double())
    H, lam = lasso_fit._gram(feat), 0.01
    g = np.random.default_rng(0)
    for j in range(2):
        q, c0 = tg.q[j].numpy(), float(tg.c0[j])
        sk = Lasso(alpha=lam, tol=1e-12, max_iter=100000).fit(xs, outputs[:, j].double().numpy())
        assert (np.abs(sk.coef_) > 1e-8).sum() > 20  # many features must enter
        for theta in (np.zeros(80), g.standard_normal(80)):
            grad = H @ theta - q
            sweeps = lasso_cd._solve(H, q, c0, lam, theta, grad, 1e-14, 100000, True)
            assert lasso_cd._REFRESH_SWEEPS < sweeps < 100000
            np.testing.assert_allclose(grad, H @ theta - q, atol=1e-12)
            np.testing.assert_allclose(theta, sk.coef_, atol=1e-6)


def test_lasso_cd_float32_path_meets_the_gap_on_the_exact_gradient():
    # fewer models than points, a long warm-started path, float32 and a tight tol: the gradient the
    # sweeps keep drifts; every solution returned is checked on H theta - q recomputed, so its true gap
    # meets tol up to float32 rounding (measured 1.11x tol here; 1.82x without the exact exits)
    masks, outputs, _ = planted(300, 600, 3, active=60, noise=0.5, seed=5)
    x = masks.double().numpy()
    xs = StandardScaler().fit_transform(x)
    lams = torch.logspace(0, -3, 60) * 0.5
    tol = 1e-5
    path = lasso_path(masks, outputs, lambdas=lams, tol=tol, dtype=torch.float32, solver="cd", max_iter=5000)
    worst = 0.0
    for k in range(60):
        for j in range(3):
            y = outputs[:, j].double().numpy()
            theta = path.weight[k, :, j].double().numpy() * x.std(0)
            yc = y - y.mean()
            worst = max(worst, _sk_gap(xs, y, theta, lams[k].item()) / (tol * (yc @ yc) / len(y)))
    assert worst <= 1.25, worst


def test_lasso_cd_exact_exit_rechecks_a_gradient_that_passes_at_once():
    # a kept gradient that is wrong enough to pass the gap before any sweep (zero: theta 0 looks
    # optimal) must not be returned as a solution when exact_exit asks for the true gap
    from pipeline.datamodels import lasso_fit, lasso_problem
    from pipeline.datamodels import lasso_cd

    masks, outputs, _ = planted(150, 80, 1, active=12, noise=0.3, seed=5)
    feat = lasso_problem._features(masks.double())
    tg = lasso_problem._targets(feat, outputs.double())
    H, q, c0, lam = lasso_fit._gram(feat), tg.q[0].numpy(), float(tg.c0[0]), 0.01
    sk = Lasso(alpha=lam, tol=1e-12, max_iter=100000).fit(StandardScaler().fit_transform(masks.double().numpy()),
                                                            outputs[:, 0].double().numpy())
    theta, grad = np.zeros(80), np.zeros(80)
    assert lasso_cd._solve(H, q, c0, lam, theta.copy(), grad.copy(), 1e-14, 100000, False) == 0
    lasso_cd._solve(H, q, c0, lam, theta, grad, 1e-14, 100000, True)
    np.testing.assert_allclose(theta, sk.coef_, atol=1e-6)


def test_lasso_cd_drops_a_constant_feature_from_any_start():
    # a constant column has a zero row of H and q 0: a start that gives it a weight must lose it
    from pipeline.datamodels import lasso_fit, lasso_problem
    from pipeline.datamodels import lasso_cd

    masks, outputs, _ = planted(120, 30, 1, active=5, seed=2)
    masks[:, 3] = True
    feat = lasso_problem._features(masks.double())
    tg = lasso_problem._targets(feat, outputs.double())
    H, q, c0 = lasso_fit._gram(feat), tg.q[0].numpy(), float(tg.c0[0])
    assert H[3, 3] == 0 and q[3] == 0
    theta = np.zeros(30)
    theta[3] = 0.5
    grad = H @ theta - q
    lasso_cd._solve(H, q, c0, 0.01, theta, grad, 1e-12, 1000, True)
    assert theta[3] == 0


def test_lasso_cd_warm_start_gradient_is_exact():
    from pipeline.datamodels import lasso_fit, lasso_problem
    from pipeline.datamodels import lasso_cd

    masks, outputs, _ = planted(100, 40, 1)
    feat = lasso_problem._features(masks.double())
    q = lasso_problem._targets(feat, outputs.double()).q[0].numpy()
    H = lasso_fit._gram(feat)
    g = np.random.default_rng(1)
    theta_old = g.standard_normal(40) * (g.random(40) < 0.3)
    theta = theta_old + 0.5 * g.standard_normal(40) * (theta_old != 0)
    theta[:4] = 0.1  # a few coefficients entering
    for slope in (0.3, 1.0, 2.0):
        start, start_grad = np.empty(40), np.empty(40)
        lasso_cd._warm_start(H, theta, theta_old, H @ theta - q, H @ theta_old - q, slope, start, start_grad)
        pred = theta + slope * (theta - theta_old)
        np.testing.assert_array_equal(start, np.where(pred * theta > 0, pred, 0))
        np.testing.assert_allclose(start_grad, H @ start - q, atol=1e-12)


@pytest.mark.parametrize("min_lambdas, patience", [(None, 1), (0, 1), (3, 1), (3, 2)])
def test_lasso_solvers_agree(min_lambdas, patience):
    # more points than models, as in real datamodels: both solvers, the same lambdas and weights
    masks, outputs, _ = planted(120, 200, 5, active=15, noise=0.5, seed=4)
    opts = dict(n_lambdas=12, tol=1e-10, dtype=torch.float64, min_lambdas=min_lambdas, patience=patience)
    cd, fista = lasso(masks, outputs, solver="cd", **opts), lasso(masks, outputs, solver="fista", **opts)
    torch.testing.assert_close(cd.lam, fista.lam)
    torch.testing.assert_close(cd.weight, fista.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(cd.bias, fista.bias, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_constant_targets_and_bad_lambdas(solver):
    # a constant target whose mean is not a float32 number (0.1): y - ybar is rounding noise, not
    # something to fit; it gets the all-zero model at once
    masks, outputs, _ = planted(80, 30, 2)
    outputs[:, 1] = 0.1
    dm = lasso(masks, outputs, n_lambdas=8, solver=solver, max_iter=5000)
    assert (dm.weight[:, 1] == 0).all() and (dm.weight[:, 0] != 0).any()
    torch.testing.assert_close(dm.bias[1], outputs[0, 1])
    with pytest.raises(ValueError, match="lambdas must be > 0"):
        lasso_path(masks, outputs, lambdas=torch.tensor([0.1, 0.0]), solver=solver)


def test_lasso_cd_threads_give_the_same_bits():
    masks, outputs, _ = planted(200, 60, 7)
    one = lasso(masks, outputs, n_lambdas=10, solver="cd", threads=1)
    for threads in (2, 3, 7):  # targets split in parts, solved in parallel threads
        more = lasso(masks, outputs, n_lambdas=10, solver="cd", threads=threads)
        assert torch.equal(one.weight, more.weight) and torch.equal(one.lam, more.lam)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_shared_design_gives_the_same_bits(solver):
    # the fit stage makes the split and both Gram matrices once per task and reuses them for the
    # margins and every class's logits: the same arrays as separate calls that each make their own
    from pipeline.datamodels import lasso_design

    masks, outputs, _ = planted(90, 40, 6)
    design = lasso_design(masks, val_fraction=0.2, seed=3)
    for part in (outputs[:, :2], outputs[:, 2:], outputs * 2 + 1):
        alone = lasso(masks, part, n_lambdas=8, val_fraction=0.2, seed=3, solver=solver)
        shared = lasso(masks, part, n_lambdas=8, val_fraction=0.2, seed=3, solver=solver, design=design)
        for a, b in ((alone.weight, shared.weight), (alone.bias, shared.bias), (alone.lam, shared.lam)):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="the design was made for"):
        lasso(masks, outputs, n_lambdas=8, val_fraction=0.2, seed=4, solver=solver, design=design)
    with pytest.raises(ValueError, match="the design was made for"):
        lasso(masks[:, :30], outputs, n_lambdas=8, val_fraction=0.2, seed=3, solver=solver, design=design)


def test_lasso_solver_choice(monkeypatch):
    from pipeline.datamodels import lasso_fit, lasso_problem

    masks, outputs, _ = planted(60, 20, 2)
    with pytest.raises(ValueError, match="unknown LASSO solver 'newton'; valid: auto, cd, fista"):
        lasso(masks, outputs, solver="newton")
    monkeypatch.setattr(lasso_problem, "GRAM_MAX_FEATURES", 10)  # no Gram matrix: cd does not apply
    with pytest.raises(ValueError, match="at most 10 training points; got device cpu and 20 points"):
        lasso(masks, outputs, solver="cd")
    assert lasso_fit._solver("auto", lasso_problem._features(masks.float())) == "fista"


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_targets_are_independent(solver):
    # targets stream through one batch at their own pace: fitting them together or alone agrees
    masks, outputs, _ = planted(300, 50, 4)
    together = lasso(masks, outputs, n_lambdas=12, tol=1e-9, dtype=torch.float64, solver=solver)
    for j in range(4):
        alone = lasso(masks, outputs[:, j : j + 1], n_lambdas=12, tol=1e-9, dtype=torch.float64, solver=solver)
        torch.testing.assert_close(together.lam[j : j + 1], alone.lam)
        torch.testing.assert_close(together.weight[:, j : j + 1], alone.weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_refit_is_the_path_solution_at_the_chosen_lambda(solver):
    masks, outputs, _ = planted(300, 50, 4)
    dm = lasso(masks, outputs, n_lambdas=12, tol=1e-8, dtype=torch.float64, solver=solver)
    assert dm.lam.shape == (4,) and (dm.lam > 0).all()
    again = lasso_path(masks, outputs, lambdas=dm.lam[None], tol=1e-8, dtype=torch.float64, solver=solver)
    torch.testing.assert_close(dm.weight, again.weight[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(dm.bias, again.bias[0], atol=1e-5, rtol=0)
    # the same split seed gives the same fit; early stopping of the path only skips smaller lambdas
    again = lasso(masks, outputs, n_lambdas=12, solver=solver)
    torch.testing.assert_close(lasso(masks, outputs, n_lambdas=12, solver=solver).weight, again.weight)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_patience_waits_for_rises_in_a_row(solver):
    """patience p: after min_lambdas a target's path stops at its p-th validation-MSE rise in a row. A
    longer wait only walks further down the path (a smaller or equal lambda, never a larger one), and a
    wait as long as the path runs the whole path, bit for bit."""
    masks, outputs, _ = planted(90, 60, 24, active=20, noise=2.0, seed=7)  # noisy validation curves
    opts = dict(n_lambdas=16, min_lambdas=3, dtype=torch.float64, solver=solver)
    first = lasso(masks, outputs, **opts)
    assert torch.equal(first.lam, lasso(masks, outputs, patience=1, **opts).lam)  # the default: fast_l1's rule
    lams = [first.lam] + [lasso(masks, outputs, patience=p, **opts).lam for p in (2, 4)]
    for shorter, longer in zip(lams, lams[1:]):
        assert (longer <= shorter).all()
    assert (lams[1] < lams[0]).any()  # some target's curve rose once and then fell again
    whole = lasso(masks, outputs, **{**opts, "min_lambdas": None})
    waited = lasso(masks, outputs, patience=16, **opts)
    assert torch.equal(whole.lam, waited.lam) and torch.equal(whole.weight, waited.weight)


@pytest.mark.parametrize("solver", SOLVERS)
def test_lasso_path_tol_only_loosens_the_path(solver):
    """path_tol loosens the path's solutions, which only choose lambda: path_tol = tol is the default bit
    for bit, and with a looser path every returned model still meets the gap over all features at its
    lambda, on all the models (the refit is solved to tol)."""
    masks, outputs, _ = planted(200, 120, 6, active=30, noise=0.8, seed=5)
    tol = 1e-6
    base = lasso(masks, outputs, n_lambdas=10, tol=tol, dtype=torch.float64, solver=solver)
    same = lasso(masks, outputs, n_lambdas=10, tol=tol, path_tol=tol, dtype=torch.float64, solver=solver)
    assert torch.equal(base.weight, same.weight) and torch.equal(base.lam, same.lam)
    loose = lasso(masks, outputs, n_lambdas=10, tol=tol, path_tol=1e-2, dtype=torch.float64, solver=solver)
    x = masks.double().numpy()
    xs = StandardScaler().fit_transform(x)
    for j in range(6):
        y = outputs[:, j].double().numpy()
        yc = y - y.mean()
        theta = loose.weight[:, j].numpy() * x.std(0)
        assert _sk_gap(xs, y, theta, loose.lam[j].item()) <= tol * (yc @ yc) / len(y) * (1 + 1e-9)


@pytest.mark.parametrize("name", ["diff_in_means", "ridge", "lasso"])
def test_recovers_planted_weights(name):
    # With i.i.d. Bernoulli(1/2) masks, E[y | i in] - E[y | i out] = w_i exactly, so difference in
    # means is unbiased with noise ~ sd(y) * 2 / sqrt(m); ridge with m >> n is nearly OLS, which is
    # unbiased for a linear model; LASSO with a validated lambda keeps the 10 strong effects.
    masks, outputs, w = planted(1000, 100, 4)
    dm = get_estimator(name)(masks, outputs)
    assert isinstance(dm, Datamodel) and dm.weight.shape == (100, 4) and dm.bias.shape == (4,)
    assert corr(dm.weight, w) > 0.9
    if name != "diff_in_means":  # regression estimators also get the intercept, up to noise
        b_true = (outputs - masks.float() @ w).mean(0)
        torch.testing.assert_close(dm.bias, b_true, atol=0.4, rtol=0)  # ~4 sd of sum_i mu_i (w_i - w_hat_i)


def test_lds_matches_scipy_spearman_with_ties():
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(40, 12, generator=g) < 0.5
    weight = torch.randint(-2, 3, (12, 5), generator=g).float()  # integer effects: tied predictions
    bias = torch.randn(5, generator=g)
    outputs = torch.randint(0, 6, (40, 5), generator=g).float()  # tied actual outputs
    ours = lds(weight, bias, masks, outputs)
    pred = (bias + masks.float() @ weight).numpy()
    for j in range(5):
        assert ours[j].item() == pytest.approx(spearmanr(pred[:, j], outputs[:, j].numpy())[0], abs=1e-6)


def test_lds_degenerate_columns():
    masks = torch.rand(30, 6, generator=torch.Generator().manual_seed(2)) < 0.5
    outputs = torch.randn(30, 2)
    outputs[:, 1] = 1.0
    score = lds(torch.zeros(6, 2), torch.zeros(2), masks, outputs)
    assert score[0].item() == 0.0  # a constant prediction has no skill
    assert torch.isnan(score[1])  # a constant target is undefined, skipped by nanmean


@pytest.mark.parametrize("name", ["diff_in_means", "lasso"])
def test_lds_grows_with_models(name):
    masks, outputs, _ = planted(700, 200, 8, active=20, noise=1.0, seed=3)
    held_m, held_y = masks[400:], outputs[400:]
    scores = [lds(*_fit(name, masks[:k], outputs[:k]), held_m, held_y).nanmean().item() for k in (50, 400)]
    assert scores[1] > scores[0] + 0.1


def _fit(name, masks, outputs):
    dm = get_estimator(name)(masks, outputs)
    return dm.weight, dm.bias


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    masks, outputs, _ = planted(300, 50, 4)
    for name in ESTIMATORS:
        same = {"solver": "fista"} if name == "lasso" else {}  # the GPU's LASSO solver, on both
        cpu = get_estimator(name)(masks, outputs, **same)
        gpu = get_estimator(name)(masks.cuda(), outputs.cuda())
        assert gpu.weight.is_cuda
        torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, atol=1e-3, rtol=0)
        held = lds(gpu.weight, gpu.bias, masks.cuda(), outputs.cuda())
        torch.testing.assert_close(held.cpu(), lds(cpu.weight, cpu.bias, masks, outputs), atol=1e-3, rtol=0)


# --------------------------------------------------------------------------------- model batches
# Every product with the masks runs over model batches (decision 35). 37 models a batch over 203:
# six batches, the last one short. Measured max |batched - unbatched| / max |unbatched weight| (float32):
# diff-in-means 2.6e-7, ridge 2.4e-6 (primal; the system's conditioning), 3.0e-7 (dual), LASSO 3.8e-7
# (cd), 5.1e-7 (fista), 7.3e-7 (fista without a Gram matrix); the lambdas move in their last bits (lam_max
# comes from q). BATCH_RTOL is 4x the largest.
BATCH_RTOL = 1e-5


def _batched_problem():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(203, 60, generator=g) < 0.5
    w = torch.randn(60, 6, generator=g) * (torch.rand(60, 6, generator=g) < 0.2)
    return masks, masks.float() @ w + 0.5 * torch.randn(203, 6, generator=g)


def _assert_batched_close(got: Datamodel, want: Datamodel) -> None:
    scale = float(want.weight.abs().max())
    torch.testing.assert_close(got.weight, want.weight, rtol=0, atol=BATCH_RTOL * scale)
    torch.testing.assert_close(got.bias, want.bias, rtol=0, atol=BATCH_RTOL * max(scale, float(want.bias.abs().max())))
    if want.lam is not None:
        torch.testing.assert_close(got.lam, want.lam, rtol=BATCH_RTOL, atol=0)


@pytest.mark.parametrize("name, models, options", [
    ("diff_in_means", 203, {}), ("ridge", 203, {}), ("ridge", 40, {}),  # ridge: primal, dual (40 < 60 points)
    ("lasso", 203, {"solver": "cd"}), ("lasso", 203, {"solver": "fista"}),
])
def test_batched_fit_equals_unbatched(name, models, options):
    masks, outputs = _batched_problem()
    masks, outputs = masks[:models], outputs[:models]
    fit = get_estimator(name)
    if name == "lasso":
        options = {**options, "tol": 1e-6}
    _assert_batched_close(fit(masks, outputs, model_batch=37, **options), fit(masks, outputs, model_batch=None, **options))


def test_batched_lasso_without_a_gram_matrix_equals_unbatched(monkeypatch):
    from pipeline.datamodels import lasso_problem

    monkeypatch.setattr(lasso_problem, "GRAM_MAX_FEATURES", 10)  # products through the masks, batch by batch
    masks, outputs = _batched_problem()
    got = lasso(masks, outputs, model_batch=37, solver="fista", tol=1e-6)
    _assert_batched_close(got, lasso(masks, outputs, model_batch=None, solver="fista", tol=1e-6))


def test_one_model_batch_keeps_the_bits_of_the_whole_product():
    """model_batch >= m: the very operations of the product over all models at once (the digits and tiny
    defaults, 4096 >= their models, are bit-identical to before batching)."""
    masks, outputs = _batched_problem()
    X = masks.float()
    yc = outputs - outputs.mean(0)
    n_in = X.sum(0)
    scale = torch.where((n_in > 0) & (n_in < 203), 203 / (n_in * (203 - n_in)).clamp_min(1), torch.zeros_like(n_in))
    weight = (X.T @ yc) * scale[:, None]
    dm = diff_in_means(masks, outputs, model_batch=203)
    assert torch.equal(dm.weight, weight) and torch.equal(dm.bias, outputs.mean(0) - X.mean(0) @ weight)
    # the LDS's predictions by batches of held-out models: rows apart, ranks equal up to float32 ties
    torch.testing.assert_close(lds(dm.weight, dm.bias, masks, outputs, model_batch=37),
                               lds(dm.weight, dm.bias, masks, outputs, model_batch=None), rtol=0, atol=1e-6)


def test_masks_batches_fill_one_buffer_with_the_rows_in_order():
    from pipeline.datamodels import Masks

    masks, _ = _batched_problem()
    view = Masks(masks, torch.tensor([5, 0, 7, 202, 3]), batch=2)
    spans, pointers = [], set()
    for rows, x in view.batches(torch.float32):
        assert torch.equal(x, masks[[5, 0, 7, 202, 3]][rows].float())
        spans.append((rows.start, rows.stop))
        pointers.add(x.data_ptr())
    assert spans == [(0, 2), (2, 4), (4, 5)] and len(pointers) == 1
    assert torch.equal(view.counts(torch.float32), masks[[5, 0, 7, 202, 3]].float().sum(0))
