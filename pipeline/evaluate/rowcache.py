"""Evaluation that is instant when nothing changed: scored rows kept in the store under the ids of what
they read, so `evaluate` and `report` recompute a row only when one of its inputs changed.

Two levels (storage_layout.md, "Score cache"; both safe to delete):

- A row (`score_rows`): what a report row's task computes (KLoM P95s with bootstrap intervals, accuracies,
  MIA, compute, ...) is kept as `<stage>/derived/scores-<key>.npz` beside the stage it scores (the unlearn
  stage of a method's row, the oracle stage of the `retrain` row). <key> names the models scored (stage
  id, count and the sha256 its markers record of their rows), the eval oracles (oracle stage id, count,
  markers), the `evaluate` section, the other config fields a row reads, the row task's arguments, the
  source of the scoring code and ROWS_VERSION. Missing rows alone are scored, as Ray tasks.
- A whole evaluation (`recall_evaluation` / `remember_evaluation`): the annotated rows and the printed
  table of one config (and filter) as `reports/<config name>/evaluations/<key>.json`, <key> the config
  without `execution`, the filters and the package's source; it is taken only while a fingerprint of
  everything the config reaches (stage records, completion records, markers' checksums, selection
  records, the imported stages) is the one recorded. Reading it needs neither torch nor Ray (seconds to
  import), so `evaluate` on a finished store answers in well under 2 s; `report` keeps the same
  fingerprint beside its files (`report_is_current`).
"""

from __future__ import annotations

import hashlib
import io
import json
from functools import lru_cache
from pathlib import Path

from pipeline.plan import Plan, method_grids, n_unlearned, selection_rels, unlearn_ref
from pipeline.store import Family, StageRef, Store

ROWS_VERSION = 1  # what a cached row holds; a new version never reuses an old row
EVALUATION_VERSION = 1
REPORT_RECORD = "EVALUATED.json"  # beside a report: the evaluation it shows


# ---------------------------------------------------------------------------------------- fingerprints
def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=None)
def source_digest(*files: str) -> str:
    """sha256 of these source files (a change to the scoring code is a changed input)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.encode() + b"\0" + Path(f).read_bytes())
    return h.hexdigest()


def _scoring_sources(task) -> tuple[str, ...]:
    import inspect

    here = Path(__file__).parent
    return (inspect.getsourcefile(task), *sorted(str(p) for p in here.glob("*.py")))


def package_digest() -> str:
    """sha256 of every module of the package: what a whole evaluation's rows and table were made by."""
    root = Path(__file__).resolve().parents[1]
    return source_digest(*sorted(str(p) for p in root.rglob("*.py")))


def markers_digest(family: Family, n: int) -> str:
    """What the markers of models 0..n say was written: their ranges and the sha256 of each block's rows."""
    marks = sorted((m["start"], m["end"], m.get("checksums")) for m in family.markers() if m["start"] < n)
    return _digest(marks)


def _family(plan: Plan, ref: StageRef, role: str) -> Family:
    return Family(plan.store, ref, role, [])


# ---------------------------------------------------------------------------------------- rows
def row_reads(plan: Plan, method: str, hparams: dict, forget_name: str) -> tuple[StageRef, dict]:
    """(the stage whose models a row scores, the ids and counts it reads): the reference oracles for
    `retrain`, else the method's unlearn stage at these hyperparameters; and the eval oracles."""
    from pipeline.unlearn import get_method

    oracle = plan.oracle(forget_name)
    n_eval = plan.cfg.train.oracle.eval
    reads = {"eval": [oracle.id, n_eval, markers_digest(_family(plan, oracle, "eval"), n_eval)]}
    if method == "retrain":
        n = plan.cfg.train.oracle.reference
        reads["models"] = [oracle.id, "reference", n, markers_digest(_family(plan, oracle, "reference"), n)]
        return oracle, reads
    ref = unlearn_ref(plan, method, get_method(method).Config.model_validate(hparams), forget_name)
    n = n_unlearned(plan.cfg)
    reads["models"] = [ref.id, "models", n, markers_digest(_family(plan, ref, "models"), n)]
    return ref, reads


def row_key(plan: Plan, reads: dict, job: tuple, task, task_args: tuple) -> str:
    t = plan.cfg.train
    return _digest({"version": ROWS_VERSION, "reads": reads, "job": list(job), "args": list(task_args),
                    "evaluate": plan.cfg.evaluate.model_dump(mode="json"),
                    "train": {"subset": t.subset.model_dump(mode="json"), "oracle": t.oracle.model_dump(mode="json")},
                    "code": source_digest(*_scoring_sources(task)), "task": f"{task.__module__}.{task.__qualname__}"})[:24]


def _row_rel(ref: StageRef, key: str) -> str:
    return f"{ref.rel}/derived/scores-{key}.npz"


def _save_row(store: Store, rel: str, row: dict) -> None:
    import numpy as np

    plain = {k: v for k, v in row.items() if k not in ("per_point", "_groups")}
    try:
        text = json.dumps(plain, default=float)
    except (TypeError, ValueError):  # a row holding something JSON cannot: scored again next time
        return
    buf = io.BytesIO()
    np.savez(buf, row=np.array(text), per_point=np.asarray(row["per_point"]))
    store.write_bytes(rel, buf.getvalue())


def _load_row(plan: Plan, rel: str, forget_name: str) -> dict | None:
    import numpy as np

    from pipeline.evaluate.oracles import group_points

    try:
        with np.load(io.BytesIO(plan.store.read_bytes(rel)), allow_pickle=False) as saved:
            row = json.loads(str(saved["row"]))
            row["per_point"] = saved["per_point"]
    except (FileNotFoundError, OSError, ValueError, KeyError):
        return None
    row["_groups"] = group_points(plan, forget_name)
    return row


def score_rows(plan: Plan, jobs: list[tuple[str, dict, str]], task, task_args: tuple = (), label: str = "report") -> list[dict]:
    """Rows of jobs (method, hyperparameters, forget set name) in order: each from its cached file when
    one with its key is there, else scored by `task(store_root, cfg, method, hparams, forget_name,
    *task_args)` as a Ray task (progress labelled `label`) and kept."""
    keyed = []
    for job in jobs:
        ref, reads = row_reads(plan, *job)
        keyed.append((job, _row_rel(ref, row_key(plan, reads, job, task, task_args))))
    rows = [_load_row(plan, rel, job[2]) if plan.store.exists(rel) else None for job, rel in keyed]
    missing = [i for i, row in enumerate(rows) if row is None]
    if missing:
        import ray

        from pipeline.execution import init_ray, run_tasks, task_options

        ex = plan.cfg.execution
        init_ray(ex)
        remote = ray.remote(task).options(**task_options(ex, gpu=False))
        refs = [(remote.remote(plan.store.root, plan.cfg, *keyed[i][0], *task_args), 1) for i in missing]
        for i, row in zip(missing, run_tasks(label, refs, len(refs), unit="rows")):
            _save_row(plan.store, keyed[i][1], row)
            rows[i] = row
    return rows


# ---------------------------------------------------------------------------------------- a whole evaluation
def reached_rels(plan: Plan) -> tuple[list[str], list[str]]:
    """(stage rels, file rels) whose state an evaluation of this config depends on: its stages, every
    unlearn stage of its grids on every forget set, the imported stages, the selection records."""
    stages = {ref.rel for _, ref in plan.all_stage_refs()}
    grids = method_grids(plan.cfg)
    for method, grid in grids.items():
        for hp in grid:
            for name in plan.forget_sets:
                stages.add(unlearn_ref(plan, method, hp, name).rel)
    stages |= {f"external/{e}" for e in plan.store.list("external") if e.startswith("external-")}
    return sorted(stages), sorted(selection_rels(plan, grids))


def store_fingerprint(plan: Plan) -> str:
    """Hash of what the evaluation read: per stage its record, completion record and markers (each
    block's checksums), and the selection records' contents."""
    store = plan.store
    stages, files = reached_rels(plan)
    state = {}
    for rel in stages:
        markers = {m: store.read_json(f"{rel}/markers/{m}") for m in store.find(f"{rel}/markers")}
        state[rel] = [store.exists(f"{rel}/stage.json"), store.read_json(f"{rel}/COMPLETE.json"),
                      {m: (v or {}).get("checksums") for m, v in markers.items()}]
    for rel in files:
        state[rel] = store.read_json(rel)
    return _digest(state)


def evaluation_key(plan: Plan, filters: dict) -> str:
    return _digest({"version": EVALUATION_VERSION, "config": plan.cfg.model_dump(mode="json", exclude={"execution"}),
                    "filters": filters, "code": package_digest()})[:24]


def _evaluation_rel(plan: Plan, key: str) -> str:
    from pipeline.store.runrecord import report_dir

    return f"{report_dir(plan.cfg)}/evaluations/{key}.json"


def recall_evaluation(plan: Plan, filters: dict) -> dict | None:
    """The recorded evaluation of this config and filters ({"rows", "table", ...} as remembered) while
    nothing it read has changed; None otherwise."""
    record = plan.store.read_json(_evaluation_rel(plan, evaluation_key(plan, filters)))
    if record is None or record.get("fingerprint") != store_fingerprint(plan):
        return None
    return record


def remember_evaluation(plan: Plan, filters: dict, fingerprint: str, payload: dict) -> None:
    """Keep an evaluation (JSON-able payload) under its key, with the fingerprint taken before it ran."""
    plan.store.write_json(_evaluation_rel(plan, evaluation_key(plan, filters)), {**payload, "fingerprint": fingerprint})


def report_is_current(plan: Plan, out: Path) -> bool:
    """Whether the report in `out` shows the evaluation the store holds now (its files are there and
    the evaluation key and fingerprint it was written from are the current ones)."""
    try:
        record = json.loads((out / REPORT_RECORD).read_text())
    except (OSError, ValueError):
        return False
    if not all((out / name).is_file() for name in ("report.md", "report.json", *record.get("files", []))):
        return False
    return record.get("key") == evaluation_key(plan, {}) and record.get("fingerprint") == store_fingerprint(plan)


def remember_report(plan: Plan, out: Path, fingerprint: str) -> None:
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != REPORT_RECORD)
    tmp = out / f".{REPORT_RECORD}.tmp"
    tmp.write_text(json.dumps({"key": evaluation_key(plan, {}), "fingerprint": fingerprint, "files": files}, indent=1))
    tmp.replace(out / REPORT_RECORD)

