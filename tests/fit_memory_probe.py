"""Run a fit task's arrays at one size in this process and print its measured peak beside the prediction.

python tests/fit_memory_probe.py '{"estimator": "diff_in_means", "models": 2048, ...}' -> one JSON line:
{"measured": bytes, "predicted": bytes, "phase": ...}. The measured peak is the highest resident anonymous
memory sampled while the task's arrays are made, less that before (after a small warm-up run that loads
the kernels), so it counts what the task's arrays add, as ``fit_peak_bytes`` does.
The computation is ``fit_block_task``'s, with its inputs made here instead of read from a store: the
block's masks and outputs, the LASSO design, one estimator call per TARGET_CHUNK targets whose results
are copied out, then the LDS of the margins and of the float16 per-logit weights on held-out models.
"""

from __future__ import annotations

import json
import sys
import threading

import torch


def anon_rss() -> int:
    """Resident anonymous memory (what arrays take): file-backed pages such as libtorch's code are left
    out, since a loaded machine evicts and refaults them and ru_maxrss then counts them as the task's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class PeakAnon:
    """The highest anon_rss() seen while the block runs, sampled every 0.2 ms by a thread (the arrays
    that make a peak live for milliseconds at least)."""

    def __enter__(self):
        self.peak, self._stop = anon_rss(), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.0002):
            self.peak = max(self.peak, anon_rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())


def bool_masks(rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Bernoulli(1/2) masks made 256 rows at a time, so that no (rows, n) float array is made here."""
    return torch.cat([torch.rand(min(256, rows - lo), n, generator=g) < 0.5 for lo in range(0, rows, 256)])


def run(cfg, models: int, n: int, targets: int, classes: int, heldout: int) -> None:
    from pipeline.datamodels import lasso_design, lds
    from pipeline.stages.fit import _estimate, call_targets, model_batch

    g = torch.Generator().manual_seed(0)
    masks = bool_masks(models, n, g)
    margins = torch.randn(models, targets, generator=g)
    logits = torch.randn(models, targets, classes, generator=g)
    design = None
    if cfg.fit.estimator == "lasso":
        design = lasso_design(masks, val_fraction=cfg.fit.lasso.val_fraction, model_batch=model_batch(cfg))
    chunk = call_targets(cfg, classes)
    weights, biases, logit_weights, logit_biases = [], [], [], []
    for lo in range(0, targets, chunk):
        hi = min(lo + chunk, targets)
        k = hi - lo
        outputs = torch.cat([margins[:, lo:hi].float(), logits[:, lo:hi].reshape(models, k * classes)], 1)
        dm = _estimate(cfg, masks, outputs, design)
        del outputs
        weights.append(dm.weight[:, :k].clone())
        biases.append(dm.bias[:k].clone())
        logit_weights.append(dm.weight[:, k:].reshape(-1, k, classes).half())
        logit_biases.append(dm.bias[k:].reshape(k, classes).clone())
        del dm
    del masks, margins, logits, design
    weight, bias = torch.cat(weights, 1), torch.cat(biases)
    theta_logit, bias_logit = torch.cat(logit_weights, 1), torch.cat(logit_biases)
    del weights, biases, logit_weights, logit_biases
    held = bool_masks(heldout, n, g)
    lds(weight, bias, held, torch.randn(heldout, targets, generator=g), model_batch(cfg))
    held_logits = torch.randn(heldout, targets, classes, generator=g).half()
    lds(theta_logit.reshape(n, -1).float(), bias_logit.reshape(-1), held, held_logits.reshape(heldout, -1),
        model_batch(cfg))


def main(spec: dict) -> dict:
    from pipeline.config import Config
    from pipeline.datamodels.memory import fit_peak_bytes
    from pipeline.stages.fit import call_targets, model_batch

    torch.set_num_threads(1)
    fit = {"estimator": spec["estimator"], "model_batch": spec.get("model_batch")}
    if spec["estimator"] == "lasso":
        fit["lasso"] = {"n_lambdas": 4, "tol": 1e-2}
    cfg = Config.model_validate({"fit": fit, "execution": {"threads": 1}})
    sizes = {k: spec[k] for k in ("models", "n", "targets", "classes", "heldout")}
    run(cfg, **{**sizes, "models": 40, "heldout": 8})  # warm-up: kernels, allocator, numba's cache
    before = anon_rss()
    with PeakAnon() as peak:
        run(cfg, **sizes)
    measured = peak.peak - before
    pred = fit_peak_bytes(estimator=cfg.fit.estimator, models=sizes["models"], n_train=sizes["n"],
                          targets=sizes["targets"], call_targets=call_targets(cfg, sizes["classes"]),
                          classes=sizes["classes"], per_logit=True, heldout=sizes["heldout"],
                          model_batch=model_batch(cfg), solver="cd", val_fraction=cfg.fit.lasso.val_fraction)
    return {"measured": measured, "predicted": pred.peak, "phase": pred.phase, "parts": pred.parts}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
