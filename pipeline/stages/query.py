"""Read precomputed attribution matrices lazily: only the chunks a query needs are read.

On a finished store (here `store` is the folder of a finished `oracle-farm run configs/tiny.yaml`;
tests/test_cli_conventions.py runs these lines as written):

    >>> from pipeline.stages.query import open_attribution
    >>> am = open_attribution("configs/tiny.yaml", [f"store={store}"])
    >>> top = am.top_k(target=1500, k=3)          # the most positive / negative training points
    >>> sorted(top), len(top["positive"]), top["positive"][0].split
    (['negative', 'positive'], 3, 'train')
    >>> am.row(train_index=3).shape               # theta[3, :]: that point's effect on every target
    (1797,)
    >>> am.self_influence().shape                 # theta[i, i] of every training point
    (1437,)
    >>> forget = am.plan.forget_sets["random10"]
    >>> out = am.predict(forget, am.full_logits(model=0), am.labels)   # dm-direct (decision 5)
    >>> out["logits"].shape, out["margins"].shape
    ((1797, 10), (1797,))
    >>> am.oracle_margins("random10").shape       # the eval oracles (retrained without it), to compare
    (4, 1797)

Column reads use `theta` (chunks (4096, 16)); row reads use `theta_rows` (chunks (16, 4096)).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class QueryError(ValueError):
    """A query names something the store does not hold (no finished fit, index out of range, ...)."""


@dataclass
class Point:
    index: int
    value: float
    label: int | None
    split: str

    def as_dict(self) -> dict:
        return {"index": self.index, "value": self.value, "label": self.label, "split": self.split}


class AttributionMatrix:
    """theta[i, j]: effect of including training point i on the margin of target point j
    (points: train ++ val), plus bias[j] and the LDS of each target."""

    def __init__(self, store, fit_rel: str, labels: np.ndarray | None, n_train: int, full_logits=None, plan=None):
        self.store, self.fit_rel, self.labels, self.n_train = store, fit_rel, labels, n_train
        self.plan = plan
        group = store.open_group(f"{fit_rel}/arrays.zarr", mode="r")
        self.theta, self.theta_rows = group["theta"], group["theta_rows"]
        self.bias, self.lds_values = group["bias"], group["lds"]
        # per-logit datamodels: the row-major copy where there is one (theta_logit may be dropped)
        logit_name = next((n for n in ("theta_logit_rows", "theta_logit") if n in group), None)
        self.theta_logit = group[logit_name] if logit_name else None
        self.n_points = self.theta.shape[1]

    # -------------------------------------------------------------- checks
    def _target(self, j: int) -> int:
        if not 0 <= j < self.n_points:
            raise QueryError(f"target {j} is out of range: targets are 0..{self.n_points - 1} "
                             f"(train 0..{self.n_train - 1}, validation {self.n_train}..{self.n_points - 1})")
        return int(j)

    def _train(self, i: int) -> int:
        if not 0 <= i < self.n_train:
            raise QueryError(f"training index {i} is out of range: 0..{self.n_train - 1}")
        return int(i)

    def _point(self, idx: int, value: float) -> Point:
        label = int(self.labels[idx]) if self.labels is not None else None
        split = "train" if idx < self.n_train else "val"
        return Point(int(idx), float(value), label, split)

    # -------------------------------------------------------------- queries
    def column(self, target: int) -> np.ndarray:
        """theta[:, target]: (n_train,) float32."""
        return self.theta[:, self._target(target)]

    def row(self, train_index: int) -> np.ndarray:
        """theta[train_index, :]: (n_points,) float32."""
        return self.theta_rows[self._train(train_index), :]

    def top_k(self, target: int, k: int = 10) -> dict[str, list[Point]]:
        """The k training points with the largest (`positive`) and the k with the smallest (`negative`)
        effect theta[i, target] on the target's margin, each list from the extreme inwards."""
        col = self.column(target)
        return _extremes(col, k, self._point)

    def row_top_k(self, train_index: int, k: int = 10) -> dict[str, list[Point]]:
        return _extremes(self.row(train_index), k, self._point)

    def self_influence(self) -> np.ndarray:
        """theta[i, i] for i in 0..n_train-1, read block by block along the diagonal."""
        out = np.empty(self.n_train, dtype=np.float32)
        step = self.theta.chunks[0]
        for start in range(0, self.n_train, step):
            stop = min(start + step, self.n_train)
            block = self.theta[start:stop, start:stop]
            out[start:stop] = np.diagonal(block)
        return out

    def lds(self) -> np.ndarray:
        return self.lds_values[:]

    def full_logits(self, model: int = 0) -> np.ndarray:
        """The stored logits (P, C) of full model `model`, float32: what `predict` starts from."""
        return self._full_output("logits", model).astype(np.float32)

    def full_margins(self, model: int = 0) -> np.ndarray:
        """The stored margins (P,) of full model `model`."""
        return self._full_output("margins", model)

    def _full_output(self, name: str, model: int) -> np.ndarray:
        from pipeline.plan import FamilySpec, family_store

        n_full = self.plan.cfg.train.full.models
        if not 0 <= model < n_full:
            raise QueryError(f"model {model} is out of range: full models are 0..{n_full - 1}")
        fam = family_store(self.plan, FamilySpec(self.plan.full, "models", n_full, "full"), self.plan.prepared_meta())
        return fam.array(name)[model]

    def oracle_margins(self, forget_set: str, role: str = "eval") -> np.ndarray:
        """Margins (oracles, P) of the forget set's oracles of `role` (retrained without it): the truth
        that dm-direct's prediction approximates."""
        from pipeline.plan import FamilySpec, family_store

        if forget_set not in self.plan.forget_sets:
            raise QueryError(f"unknown forget set {forget_set!r}; known: {sorted(self.plan.forget_sets)}")
        n = getattr(self.plan.cfg.train.oracle, role)
        fam = family_store(self.plan, FamilySpec(self.plan.oracle(forget_set), role, n, "oracle"),
                           self.plan.prepared_meta())
        if n == 0 or not fam.done_mask(n).all():
            raise QueryError(f"the {role} oracles of {forget_set!r} are not trained: run `oracle-farm train`")
        return fam.read("margins", n)

    def predict(self, forget: np.ndarray, full_logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
        """dm-direct (decision 5): logits of a full model minus the summed per-logit rows of the forget set.
        full_logits (P, C) -> {"logits": (P, C), "margins": (P,)}."""
        if self.theta_logit is None:
            raise QueryError("this fit has no per-logit datamodels (fit.per_logit: false)")
        forget = np.asarray(forget)
        for i in forget:
            self._train(int(i))
        from pipeline.stages.fit import forget_rows, read_forget_rows, sum_forget_rows

        if self.plan is not None:  # the fit tasks' parts, or F's rows of theta_logit_rows; nothing written
            sums = forget_rows(self.plan, forget, keep=False)[0]
        elif self.theta_logit.name.endswith("_rows"):
            sums = read_forget_rows(self.theta_logit, forget)[0]
        else:
            sums = sum_forget_rows(self.theta_logit, forget)[0]
        logits = full_logits.astype(np.float32) - sums
        correct = logits[np.arange(len(labels)), labels]
        others = logits.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        margins = correct - np.logaddexp.reduce(others, axis=1)
        return {"logits": logits, "margins": margins}


def _extremes(values: np.ndarray, k: int, make) -> dict[str, list[Point]]:
    k = max(1, min(k, len(values)))
    top = np.argpartition(-values, k - 1)[:k]
    bottom = np.argpartition(values, k - 1)[:k]
    top = top[np.argsort(-values[top], kind="stable")]
    bottom = bottom[np.argsort(values[bottom], kind="stable")]
    return {"positive": [make(i, values[i]) for i in top], "negative": [make(i, values[i]) for i in bottom]}


def ranked_ends(values: np.ndarray, k: int, make) -> tuple[dict[str, list[Point]], list[str]]:
    """The k highest and the k lowest values, each highest first / lowest first, and notes. A value
    shared beyond the cut of a list (e.g. the hundreds of exact zeros a LASSO leaves on the diagonal)
    is skipped from that list, not shown as k arbitrary ties: a note says how many points hold it."""
    k = max(1, min(k, len(values)))
    order = np.argsort(values, kind="stable")
    out, notes = {}, []
    for name, idx in (("highest", order[::-1][:k]), ("lowest", order[:k])):
        cut = values[idx[-1]]
        tied = int(np.count_nonzero(values == cut))
        if tied > int(np.count_nonzero(values[idx] == cut)):  # the cut splits a tie: which ones show is arbitrary
            idx = idx[values[idx] != cut]
            notes.append(f"{name}: {tied} points have exactly {float(cut):+.5g}, not listed")
        out[name] = [make(int(i), values[i]) for i in idx]
    return out, notes


def open_attribution(config_path: str, overrides: list[str] = ()) -> AttributionMatrix:
    """The attribution matrix of a config's finished fit stage."""
    from pipeline.config import load_config
    from pipeline.plan import Plan
    from pipeline.store import Store, is_complete

    cfg = load_config(config_path, list(overrides))
    plan = Plan(cfg, Store(cfg.store))
    plan.store.check_reachable(create=False)
    if not is_complete(plan.store, plan.fit):
        where = plan.store.root
        if plan.store.is_local and not Path(cfg.store).expanduser().is_absolute():
            where += f" (the config's `store: {cfg.store}`, relative to the working directory {Path.cwd()})"
        found = "holds no finished fit" if plan.store.exists("prepare") else "holds no store"
        raise QueryError(f"the fit stage {plan.fit.id} of {config_path} is not finished: {where} {found}; "
                         "point `store` (or --set store=...) at the store of the finished run, or run "
                         "`oracle-farm fit`")
    meta = plan.prepared_meta()
    group = plan.store.open_group(f"{plan.prepare.rel}/arrays.zarr", mode="r")
    labels = np.concatenate([group["labels/train"][:], group["labels/val"][:]])
    return AttributionMatrix(plan.store, plan.fit.rel, labels, meta["n_train"], plan=plan)
