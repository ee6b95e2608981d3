"""A fit task's peak memory, predicted from its sizes before it starts (decision 35).

``fit_peak_bytes`` counts the arrays ``pipeline.stages.fit.fit_block_task`` holds, phase by phase: the
fit (the block's masks and outputs, LASSO's design, one estimator call's arrays, the results kept so
far) and then the held-out scoring (the kept results, the held-out models' masks and outputs, the
predictions and their ranks). The peak is the larger phase. Masks are bool (1 byte a value); every
product with them fills one (model_batch, n_train) float buffer at a time, so what grows with the
number of models is the masks (bool), the outputs (models x targets) and, for ridge's dual form and
the CPU LASSO solver's validation design, the parts named so.

What it leaves out: the interpreter and torch's own memory (a few hundred MB of host RSS, the CUDA
context), and allocator slack. Measured against the real peak (``tests/test_fit_memory.py``:
``ru_maxrss`` of a subprocess running a fit task's arrays on the CPU, less its RSS before, with glibc's
mmap threshold fixed at 64 KiB), the measured growth was 0.72x-1.04x the prediction at every size tried
there (diff-in-means, ridge primal and dual, LASSO by cd, held-out scoring); with glibc's default
threshold, freed arrays linger and the held-out scoring phase measured 1.2x-1.6x, run to run.

The CPU LASSO solver (``lasso_cd``) needs the Gram matrix: two n x (n + 1) matrices (fitting and all
models) and their two NumPy copies, 16 n^2 bytes in float32 (130 MiB at digits' 1,437 points, 1 GiB at
4,096), plus the validation models' standardised design, 4 n x val_fraction x models bytes. Beyond
GRAM_MAX_FEATURES points there is no Gram matrix (the FISTA solver's products go through the masks).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.datamodels.lasso_problem import GRAM_MAX_FEATURES


@dataclass(frozen=True)
class FitMemory:
    """peak (bytes) = the sum of parts (name -> bytes) of the phase that is largest (``phase``)."""

    peak: int
    phase: str
    parts: dict[str, int]

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{name} {gib(size)}" for name, size in big if size >= 1 << 20) or "nothing over 1 MiB"


def gib(size: float) -> str:
    """size (bytes) in GiB, or in MiB below 1 GiB."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def fit_peak_bytes(
    *,
    estimator: str,
    models: int,
    n_train: int,
    targets: int,
    call_targets: int,
    classes: int,
    per_logit: bool,
    heldout: int,
    model_batch: int,
    dtype_bytes: int = 4,
    solver: str = "cd",
    val_fraction: float = 0.1,
    host_bands: int = 0,
) -> FitMemory:
    """Predicted peak of one fit task. models: subset models fitted; n_train: training points (the
    datamodels' features); targets: the task's block of targets (execution.fit_block_targets); call_targets:
    targets per estimator call; classes; per_logit: the per-logit datamodels too; heldout: held-out models
    scored; model_batch: models per float batch; solver: LASSO's, "cd" (CPU) or "fista"; host_bands: bytes
    of decoded subset bands a CPU worker keeps between tasks (``fit._KEPT``; 0 on a GPU, whose host
    memory is not the device's)."""
    f, m, n, h = dtype_bytes, models, n_train, heldout
    outs = 1 + (classes if per_logit else 0)  # outputs per target: the margin and each class's logit
    t = call_targets * outs  # columns of one estimator call
    buffer = min(model_batch, m) * n * f
    results = n * targets * f + (n * targets * classes * 2 if per_logit else 0)  # theta, theta_logit (float16)

    fit = {
        "masks (bool)": m * n,
        "block outputs (margins, logits)": m * targets * outs * f,
        "results kept (theta, theta_logit)": results,
        "mask float buffer": buffer,
        "call outputs": 2 * m * t * f,
    }
    phases = {"fit": fit}
    fit.update(_estimator_parts(estimator, m, n, t, f, solver, val_fraction, model_batch))
    if estimator == "lasso" and n <= GRAM_MAX_FEATURES:  # the Gram matrices are made before any call
        phases["LASSO design"] = {k: v for k, v in fit.items() if k in _HELD} | {
            "Gram matrices (fitting, all models; n_train^2 each)": 2 * n * (n + 1) * f,
            "Gram matrices' moments while made": 3 * n * n * f, "mask float buffer": buffer}
    score_t = targets * outs
    score = {
        "results kept (theta, theta_logit)": 2 * results,  # the chunks' and their concatenation
        "theta_logit as float32 for scoring": n * targets * classes * f if per_logit else 0,
        "held-out masks (bool)": h * n,
        "held-out outputs": h * score_t * (f + 2),
        "held-out mask float buffer": min(model_batch, h) * n * f,
        "predictions and ranks": h * score_t * 44,  # float32 predictions, float64 ranks, int64 sort indices
    }
    phases["held-out scoring"] = score
    for parts in phases.values():
        if host_bands:
            parts["decoded subset bands (host)"] = host_bands
    phase = max(phases, key=lambda k: sum(phases[k].values()))
    parts = {k: int(v) for k, v in phases[phase].items() if v}
    return FitMemory(peak=sum(parts.values()), phase=phase, parts=parts)


_HELD = ("masks (bool)", "block outputs (margins, logits)", "results kept (theta, theta_logit)")


def _estimator_parts(
    estimator: str, m: int, n: int, t: int, f: int, solver: str, val_fraction: float, model_batch: int
) -> dict[str, int]:
    """One estimator call's own arrays (and LASSO's design, made once per task)."""
    if estimator == "diff_in_means":
        return {"centred outputs": m * t * f, "products and weights": 3 * n * t * f}
    if estimator == "ridge":
        side = min(m, n)
        return {"ridge system, its Cholesky factor and LAPACK copy (min(models, n_train)^2)": 3 * side * side * f,
                "centred outputs": m * t * f, "products and weights": 3 * n * t * f}
    if estimator != "lasso":
        raise ValueError(f"unknown estimator {estimator!r}")
    v = round(val_fraction * m)
    parts = {"LASSO targets and solver state": 16 * n * t * f, "LASSO split outputs": 2 * m * t * f}
    if n <= GRAM_MAX_FEATURES:
        parts["Gram matrices (fitting, all models; n_train^2 each)"] = 2 * n * (n + 1) * f
        if solver == "cd":
            parts["Gram matrices' NumPy copies (cd)"] = 2 * n * n * f
            parts["validation design (cd)"] = n * v * f
        else:
            parts["gradient tables (Gram rows per system)"] = 2 * (n + t) * (n + 1) * f
    else:  # no Gram matrix: standardised batches kept per system when one batch holds all models
        parts["standardised mask buffers"] = 2 * min(model_batch, m) * n * f + min(model_batch, v) * n * f
        parts["residuals per batch"] = t * min(model_batch, m) * f
    return parts
