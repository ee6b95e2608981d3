"""Exchange with other tools: import externally produced margins, export any stored array.

Import (`oracle-farm import-margins`): a `.npy` or `.npz` of margins, shape (models, points), points =
n_train + n_val of the config's prepared dataset (train first, as every family stores them), float32
(float64 is accepted and cast to float32 when every value fits). The file is read with
`allow_pickle=False`, so a pickled object array is refused, and it is checked whole (shape, dtype,
finite values) before anything is written. It becomes an external family, stage kind `external`:

    external/external-<id>/stage.json   import kind, method, forget set, name, source file, its sha256
    external/external-<id>/arrays.zarr/models/margins   float32 (N, P), chunks (1, P)
    external/external-<id>/markers/models/<start>-<end>.json   written after the rows, as everywhere

id = stage_id("external", {sha256 of the file, kind, method, forget set id, name, points},
{prepare id, forget set id}). Imported `unlearned` margins of method M on a reported forget set F are
scored by `evaluate` / `report` as the row `M (imported)` (see `imported_rows`).

Export (`oracle-farm export`): any stored array to `.npy` (written through a memory map) or Parquet
(one row group per chunk of rows), chunk by chunk, never the whole array in memory. Parquet columns are
named by the array's `dimension_names` (`pipeline.store.ARRAY_DOCS`), in one of two layouts:
  long (default): one row per element, an int64 column per axis and the values, e.g. full/margins ->
                  `model`, `point`, `margins` (N x P rows);
  wide:           one row per entry of the first axis, a column per entry of the others, e.g.
                  `model`, `point_0`, ..., `point_{P-1}`; 3-D: `point_0_class_0`, ...
1-D arrays are the same in both (`target`, `lds`). The key-value metadata `oracle_farm` holds the shape,
dtype, axes, layout, the stage (relative to the store root: no local path) and the --array spec
(`read_parquet_array` rebuilds the array). `--forget-set NAME` exports a forget set's sorted training
indices (column `train_point`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.store import ArraySpec, Family, StageRef, Store, ensure_stage, is_complete, mark_complete

IMPORT_KINDS = ("full", "oracle", "unlearned")
EXTERNAL = "external"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_CHUNK_BYTES = 64 << 20


class ExchangeError(ValueError):
    """A file to import or an array to export is not what it must be: the message names it."""


# ---------------------------------------------------------------------------------------- reading a file
def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def open_arrays(path: str | Path, what: str) -> dict:
    """The arrays of a .npy ({"": array}, memory-mapped), a .npz (by key) or a Zarr group (a folder, by
    name), read with allow_pickle=False: ExchangeError naming the file for anything else (a pickle)."""
    path = Path(path)
    if path.is_dir():
        return _open_zarr(path)
    if not path.is_file():
        raise ExchangeError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise ExchangeError(f"{path}: expected a .npy or .npz file or a Zarr group (a folder), got {suffix or 'no suffix'!r}")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if not head.startswith(b"\x93NUMPY" if suffix == ".npy" else b"PK"):
        raise ExchangeError(f"{path}: not a readable NumPy file (no {'.npy' if suffix == '.npy' else 'zip'} header)")
    pickled = f"{path}: holds Python objects (a pickled object array); refused: save a float array of {what}"
    try:
        if suffix == ".npy":
            try:
                return {"": np.load(path, mmap_mode="r", allow_pickle=False)}
            except ValueError as exc:
                if "memory-mapped" in str(exc) or "object" in str(exc).lower():
                    raise ExchangeError(pickled) from None
                raise
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except ExchangeError:
        raise
    except ValueError as exc:
        msg = str(exc)
        if "pickle" in msg.lower() or "object" in msg.lower():
            raise ExchangeError(pickled) from None
        raise ExchangeError(f"{path}: not a readable NumPy file ({msg})") from None
    except (OSError, EOFError) as exc:
        raise ExchangeError(f"{path}: not a readable NumPy file ({type(exc).__name__}: {exc})") from None


def _open_zarr(path: Path) -> dict:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - any failure to open is the file's fault
        raise ExchangeError(f"{path}: a folder that is not a readable Zarr group ({type(exc).__name__}: {exc})") from None
    return {name: arr for name, arr in group.arrays()}


def load_margins_file(path: str | Path, n_points: int) -> tuple[np.ndarray, list[str]]:
    """The margins array of a .npy/.npz (memory-mapped when .npy), validated; warnings to show."""
    path = Path(path)
    if path.is_dir():
        raise ExchangeError(f"{path}: expected a .npy or .npz file, got a folder")
    arrays = open_arrays(path, "margins")
    keys = list(arrays)
    key = "margins" if "margins" in keys else (keys[0] if len(keys) == 1 else None)
    if key is None:
        raise ExchangeError(f"{path}: holds arrays {keys}; name the margins `margins` or keep only one")
    return validate_margins(arrays[key], n_points, str(path))


def validate_margins(arr: np.ndarray, n_points: int, where: str) -> tuple[np.ndarray, list[str]]:
    warnings = []
    if arr.dtype.hasobject:
        raise ExchangeError(f"{where}: holds Python objects; refused: save a float32 array of margins")
    if arr.dtype not in (np.float32, np.float64):
        raise ExchangeError(f"{where}: dtype {arr.dtype}; margins must be float32 (or float64, cast to float32)")
    if arr.ndim != 2:
        raise ExchangeError(f"{where}: shape {arr.shape}; expected (models, points) with points = {n_points}")
    if arr.shape[1] != n_points:
        raise ExchangeError(f"{where}: shape {arr.shape} has {arr.shape[1]} points per model; the config's "
                            f"prepared dataset has n_train + n_val = {n_points} (train points first)")
    if arr.shape[0] < 1:
        raise ExchangeError(f"{where}: no models (shape {arr.shape})")
    step = max(1, _CHUNK_BYTES // max(1, arr.shape[1] * arr.dtype.itemsize))
    for start in range(0, arr.shape[0], step):
        rows = np.asarray(arr[start : start + step])
        with np.errstate(over="ignore", invalid="ignore"):
            cast = rows.astype(np.float32)
        bad = ~np.isfinite(cast)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            what = "a non-finite value" if not np.isfinite(rows[r, c]) else "a value too large for float32"
            raise ExchangeError(f"{where}: {what} ({float(rows[r, c])}) at model {start + r}, point {c}; "
                                "every margin must be finite")
    if arr.dtype == np.float64:
        warnings.append(f"{where}: float64 margins cast to float32")
    return arr, warnings


# ---------------------------------------------------------------------------------------- import
def external_ref(digest: str, description: dict, upstream: dict) -> StageRef:
    from pipeline.config import stage_id

    return StageRef(EXTERNAL, stage_id(EXTERNAL, {"sha256": digest, **description}, upstream))


def import_margins(plan, path: str | Path, kind: str, forget_set: str | None = None, method: str | None = None,
                   name: str | None = None) -> dict:
    """Validate the file whole, then write it as an external family (rows, then markers)."""
    from pipeline.data.forget_sets import forget_set_id
    from pipeline.plan import pending_blocks
    from pipeline.store.lease import hold

    path = Path(path)
    if kind not in IMPORT_KINDS:
        raise ExchangeError(f"--kind {kind!r}: expected one of {', '.join(IMPORT_KINDS)}")
    if kind in ("oracle", "unlearned") and not forget_set:
        raise ExchangeError(f"--kind {kind} needs --forget-set NAME (one of {sorted(plan.forget_sets)})")
    if kind == "full" and forget_set:
        raise ExchangeError("--kind full takes no --forget-set")
    if kind == "unlearned" and not method:
        raise ExchangeError("--kind unlearned needs --method NAME (the row is reported as `NAME (imported)`)")
    for flag, value in (("--method", method), ("--name", name)):
        if value is not None and not _NAME.match(value):
            raise ExchangeError(f"{flag} {value!r}: use letters, digits and _.+- (at most 64 characters)")
    if forget_set is not None and forget_set not in plan.forget_sets:
        raise ExchangeError(f"--forget-set {forget_set!r}: unknown; the config's forget sets are "
                            f"{sorted(plan.forget_sets)}")
    meta = plan.prepared_meta()
    n_points = meta["n_train"] + meta["n_val"]
    arr, warnings = load_margins_file(path, n_points)  # everything checked before any write
    digest = file_digest(path)
    fid = forget_set_id(plan.forget_sets[forget_set]) if forget_set else None
    description = {"kind": kind, "method": method, "forget": fid, "name": name or "", "points": n_points}
    upstream = {"prepare": plan.prepare.id, **({"forget": fid} if fid else {})}
    ref = external_ref(digest, description, upstream)
    n = int(arr.shape[0])
    section = {**description, "forget_set": forget_set, "source": path.name, "sha256": digest, "models": n,
               "dtype": str(arr.dtype)}
    family = Family(plan.store, ref, "models", [ArraySpec("margins", (n_points,), "float32")])
    plan.store.check_reachable()
    if plan.store.exists(f"{ref.rel}/stage.json"):  # already imported: read-only (ensure_stage only compares)
        ensure_stage(plan.store, ref, section, upstream, plan.cfg.name)
        if family.done_mask(n).all():
            return {"ref": ref, "models": n, "written": 0, "warnings": warnings, "url": plan.store.url(ref.rel)}
    with hold(plan.store, [ref.rel], plan.cfg.execution):
        ensure_stage(plan.store, ref, section, upstream, plan.cfg.name)
        block = max(1, min(plan.cfg.execution.block_size, _CHUNK_BYTES // (4 * n_points)))
        chunk = family.ensure_arrays(n, block)
        done = family.done_mask(n)
        written = 0
        for start, end in pending_blocks(done, block, chunk):
            rows = np.asarray(arr[start:end], dtype=np.float32)
            family.write_block(start, {"margins": rows}, {"source": path.name, "imported": time.time()})
            written += end - start
    return {"ref": ref, "models": n, "written": written, "warnings": warnings, "url": plan.store.url(ref.rel)}


# ---------------------------------------------------------------------------------------- attribution
ATTRIBUTION_KINDS = ("per_logit", "per_margin")
# the names an attribution file may give its arrays -> the fit's array they become
_ATTRIBUTION_NAMES = {"theta_logit": "theta_logit", "per_logit": "theta_logit", "theta": "theta",
                      "per_margin": "theta", "bias": "bias", "bias_logit": "bias_logit"}
_KIND_ARRAY = {"per_logit": "theta_logit", "per_margin": "theta"}
_STORED_DTYPE = {"theta_logit": "float16"}  # as the fit stores them; every other array float32


def _fit_chunks(name: str, n: int, p: int, c: int) -> tuple:
    """The chunks the fit gives its array `name` (pipeline.stages.fit: TRAIN_CHUNK, LOGIT_TRAIN_CHUNK and
    VECTOR_CHUNK; storage_layout.md)."""
    from pipeline.plan import TARGET_CHUNK as T

    vector = min(4096, p)
    return {"theta": (min(4096, n), T), "theta_rows": (T, min(4096, p)), "theta_logit": (min(256, n), T, c),
            "bias_logit": (vector, c), "lds_logit": (vector, c)}.get(name, (vector,))


_LDS_TARGETS = 256  # targets scored at once


def attribution_arrays(path: str | Path, kind: str | None, meta: dict) -> dict:
    """fit array name -> the file's array, every one checked whole (shape against the prepared dataset,
    a float dtype, finite values once stored as the fit stores them) before anything is written."""
    if kind is not None and kind not in ATTRIBUTION_KINDS:
        raise ExchangeError(f"--kind {kind!r}: expected one of {', '.join(ATTRIBUTION_KINDS)}")
    n, p, c = meta["n_train"], meta["n_train"] + meta["n_val"], meta["classes"]
    shapes = {"theta_logit": (n, p, c), "theta": (n, p), "bias": (p,), "bias_logit": (p, c)}
    found = open_arrays(path, "attribution scores")
    if set(found) == {""} or (len(found) == 1 and next(iter(found)) not in _ATTRIBUTION_NAMES):
        arr = next(iter(found.values()))  # one unnamed array: its rank says which
        named = {3: "theta_logit", 2: "theta"}.get(arr.ndim)
        if named is None:
            raise ExchangeError(f"{path}: shape {arr.shape}; expected per-logit (train points, targets, classes) = "
                                f"{shapes['theta_logit']} or per-margin (train points, targets) = {shapes['theta']}")
        found = {named: arr}
    unknown = sorted(set(found) - set(_ATTRIBUTION_NAMES))
    if unknown:
        raise ExchangeError(f"{path}: arrays {unknown} are not attribution arrays; name them "
                            "theta_logit (or per_logit), theta (or per_margin), bias, bias_logit")
    arrays = {_ATTRIBUTION_NAMES[k]: v for k, v in found.items()}
    if kind is not None:
        if _KIND_ARRAY[kind] not in arrays:
            raise ExchangeError(f"{path}: --kind {kind}, but the file holds no {kind.replace('_', '-')} matrix "
                                f"(it holds {sorted(found)})")
        keep = {_KIND_ARRAY[kind], "bias" if kind == "per_margin" else "bias_logit"}
        arrays = {k: v for k, v in arrays.items() if k in keep}
    if "theta_logit" not in arrays and "theta" not in arrays:
        raise ExchangeError(f"{path}: holds no attribution matrix (theta_logit or theta), only {sorted(found)}")
    for name, arr in arrays.items():
        _check_attribution(arr, name, shapes[name], f"{path} ({name})")
    return arrays


def _check_attribution(arr, name: str, shape: tuple, where: str) -> None:
    dtype = np.dtype(arr.dtype)
    if dtype.hasobject or dtype not in (np.float16, np.float32, np.float64):
        raise ExchangeError(f"{where}: dtype {dtype}; attribution scores must be float16, float32 or float64")
    if tuple(arr.shape) != shape:
        axes = {"theta_logit": "(train points, targets, classes)", "theta": "(train points, targets)",
                "bias": "(targets,)", "bias_logit": "(targets, classes)"}[name]
        raise ExchangeError(f"{where}: shape {tuple(arr.shape)}; expected {axes} = {shape} for the config's prepared "
                            "dataset (targets = n_train + n_val, train points first)")
    stored = np.dtype(_STORED_DTYPE.get(name, "float32"))
    row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    step = max(1, _CHUNK_BYTES // row)
    for start in range(0, shape[0], step):
        rows = np.asarray(arr[start : start + step])
        with np.errstate(over="ignore", invalid="ignore"):
            bad = ~np.isfinite(rows.astype(stored))
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            value = float(rows[at])
            what = "a non-finite value" if not np.isfinite(value) else f"a value too large for {stored}"
            raise ExchangeError(f"{where}: {what} ({value}) at index {(start + at[0], *at[1:])}; every score must "
                                "be finite")


def files_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files (their relative paths and contents, in sorted order)."""
    if not path.is_dir():
        return file_digest(path)
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_digest(f)}\0".encode())
    return h.hexdigest()


def import_attribution(plan, path: str | Path, name: str, kind: str | None = None) -> dict:
    """Validate the file whole, then write it as an external stage with a fit's arrays and layout
    (theta_logit / theta, their biases, theta_rows) and the LDS on the held-out subset models when they are
    trained; COMPLETE.json last. `fit.attribution: NAME` makes dm-direct and DMM read it."""
    from pipeline.plan import EXTERNAL_ATTRIBUTION, attribution_stages
    from pipeline.store.lease import hold

    path = Path(path)
    if not _NAME.match(name or ""):
        raise ExchangeError(f"--name {name!r}: use letters, digits and _.+- (at most 64 characters)")
    meta = plan.prepared_meta()
    arrays = attribution_arrays(path, kind, meta)  # everything checked before any write
    n, p, c = meta["n_train"], meta["n_train"] + meta["n_val"], meta["classes"]
    digest = files_digest(path)
    description = {"kind": EXTERNAL_ATTRIBUTION, "name": name, "points": p, "n_train": n, "classes": c,
                   "per_logit": "theta_logit" in arrays, "per_margin": "theta" in arrays,
                   "bias_given": sorted(k for k in ("bias", "bias_logit") if k in arrays)}
    upstream = {"prepare": plan.prepare.id}
    ref = external_ref(digest, description, upstream)
    taken = attribution_stages(plan.store, plan.prepare.id).get(name)
    if taken is not None and taken != ref:
        raise ExchangeError(f"--name {name!r} is taken on this prepared dataset by {taken.rel} (another file or "
                            "other arrays): choose another name, or remove that stage (`oracle-farm gc`)")
    section = {**description, "source": path.name, "sha256": digest,
               "dtypes": {k: str(np.dtype(v.dtype)) for k, v in arrays.items()}}
    plan.store.check_reachable()
    if is_complete(plan.store, ref):
        ensure_stage(plan.store, ref, section, upstream, plan.cfg.name)  # read-only: compares
        return {"ref": ref, "written": False, "url": plan.store.url(ref.rel),
                **plan.store.read_json(f"{ref.rel}/COMPLETE.json")}
    with hold(plan.store, [ref.rel], plan.cfg.execution):
        ensure_stage(plan.store, ref, section, upstream, plan.cfg.name)
        group = plan.store.open_group(f"{ref.rel}/arrays.zarr")
        written = _write_attribution(group, ref, arrays, n, p, c)
        summary = {"estimator": "external", "name": name, "source": path.name,
                   **_attribution_lds(plan, meta, group, ref, written)}
        mark_complete(plan.store, ref, summary)
    return {"ref": ref, "written": True, "url": plan.store.url(ref.rel), **summary}


def _write_attribution(group, ref: StageRef, arrays: dict, n: int, p: int, c: int) -> list[str]:
    """The fit's arrays from the file's (named axes and attributes, `Store.create_array`): biases zero unless
    given, theta_rows a copy of theta, lam NaN."""
    out = dict(arrays)
    if "theta" in arrays:
        out["theta_rows"] = arrays["theta"]
        out.setdefault("bias", np.zeros(p, np.float32))
        out["lam"] = np.full(p, np.nan, np.float32)
    if "theta_logit" in arrays:
        out.setdefault("bias_logit", np.zeros((p, c), np.float32))
    for name, src in out.items():
        dst = Store.create_array(group, name, stage=ref, shape=tuple(src.shape), chunks=_fit_chunks(name, n, p, c),
                                 dtype=_STORED_DTYPE.get(name, "float32"), overwrite=True)  # an interrupted import: anew
        _copy_bands(src, dst)
    return sorted(out)


def _copy_bands(src, dst) -> None:
    """dst[:] = src, by bands of whole row chunks (and of whole column chunks where a band would pass
    _CHUNK_BYTES), cast to dst's dtype."""
    rows = dst.chunks[0]
    if dst.ndim == 1:
        dst[:] = np.asarray(src[:], dtype=dst.dtype)
        return
    per_column = rows * int(np.prod(dst.shape[2:], dtype=np.int64)) * 8
    cols = max(dst.chunks[1], _CHUNK_BYTES // per_column // dst.chunks[1] * dst.chunks[1])
    for a in range(0, dst.shape[0], rows):
        for b in range(0, dst.shape[1], cols):
            dst[a : a + rows, b : b + cols] = np.asarray(src[a : a + rows, b : b + cols], dtype=dst.dtype)


def _attribution_lds(plan, meta: dict, group, ref: StageRef, written: list[str]) -> dict:
    """`lds` (P,) of theta and `lds_logit` (P, C) of theta_logit on the held-out subset models (decision 34),
    as the fit scores its own (pipeline.datamodels.lds, of the weights as stored), with the fit's summary
    keys; NaN and None where the held-out models are not trained (or fewer than 3)."""
    import torch

    from pipeline.datamodels import lds
    from pipeline.plan import FamilySpec, family_store

    n, p, c = meta["n_train"], meta["n_train"] + meta["n_val"], meta["classes"]
    sub = plan.cfg.train.subset
    family = family_store(plan, FamilySpec(plan.subset, "heldout", sub.heldout, "subset", alpha=sub.alpha,
                                           logits=sub.store_logits), meta)
    measured = sub.heldout >= 3 and family.done_mask(sub.heldout).all()
    out = {"heldout": sub.heldout if measured else 0, "lds_on": plan.subset.id if measured else None}
    masks = torch.as_tensor(family.array("masks")[: sub.heldout]) if measured else None
    for theta, bias, actual, score, keys in (
            ("theta", "bias", "margins", "lds", ("lds_mean", "lds_train_mean", "lds_val_mean")),
            ("theta_logit", "bias_logit", "logits", "lds_logit",
             ("lds_logit_mean", "lds_logit_train_mean", "lds_logit_val_mean"))):
        if theta not in written:
            continue
        shape = (p,) if score == "lds" else (p, c)
        values = np.full(shape, np.nan, np.float32)
        if measured and (actual == "margins" or sub.store_logits):
            for a in range(0, p, _LDS_TARGETS):
                b = min(p, a + _LDS_TARGETS)
                w = torch.as_tensor(np.asarray(group[theta][:, a:b], dtype=np.float32)).reshape(n, -1)
                y = torch.as_tensor(np.asarray(family.array(actual)[: sub.heldout, a:b], dtype=np.float32))
                bias_ab = torch.as_tensor(np.asarray(group[bias][a:b], dtype=np.float32)).reshape(-1)
                values[a:b] = lds(w, bias_ab, masks, y.reshape(sub.heldout, -1)).numpy().reshape(values[a:b].shape)
        Store.create_array(group, score, stage=ref, shape=shape, chunks=_fit_chunks(score, n, p, c), dtype="float32",
                           overwrite=True)[:] = values
        for key, part in zip(keys, (values, values[:n], values[n:])):
            out[key] = float(np.nanmean(part)) if np.isfinite(part).any() else None
        if score == "lds_logit":
            out["lds_logit_per_class"] = [float(np.nanmean(values[:, k])) if np.isfinite(values[:, k]).any() else None
                                          for k in range(c)]
    return out


def external_stages(store: Store, prepare_id: str | None = None) -> list[dict]:
    """Every external stage record (optionally only those made on this prepared dataset)."""
    out = []
    for entry in store.list(EXTERNAL):
        if not entry.startswith(f"{EXTERNAL}-"):
            continue
        rel = f"{EXTERNAL}/{entry}"
        rec = store.read_json(f"{rel}/stage.json")
        if rec is None or (prepare_id is not None and rec.get("upstream", {}).get("prepare") != prepare_id):
            continue
        out.append({**rec, "ref": StageRef(EXTERNAL, rec["id"])})
    return out


def external_reached(plan) -> list[dict]:
    """External stages a config would use: on its prepared dataset, and (when tied to a forget set)
    on one of its forget sets."""
    from pipeline.data.forget_sets import forget_set_id

    fids = {forget_set_id(v) for v in plan.forget_sets.values()}
    return [r for r in external_stages(plan.store, plan.prepare.id)
            if r.get("upstream", {}).get("forget") in (None, *fids)]


def _complete_family(store: Store, rec: dict) -> tuple[Family, int] | None:
    n = int(rec["config"]["models"])
    family = Family(store, rec["ref"], "models", [ArraySpec("margins", (rec["config"]["points"],), "float32")])
    return (family, n) if family.done_mask(n).all() else None


def imported_rows(plan, forget_name: str, n_u: int, labels: np.ndarray) -> list[dict]:
    """Report rows `M (imported)` for complete imported `unlearned` margins on this forget set, scored
    like any method (KLoM against the eval oracles, MIA); accuracy and compute are unknown (None).
    When more than N_u models were imported the first N_u are scored (equal sample sizes, decision 17)."""
    from pipeline.data.forget_sets import forget_set_id
    from pipeline.evaluate.oracles import score

    fid = forget_set_id(plan.forget_sets[forget_name])
    rows = []
    for rec in external_reached(plan):
        cfg = rec["config"]
        if cfg.get("kind") != "unlearned" or cfg.get("forget") != fid:
            continue
        got = _complete_family(plan.store, rec)
        if got is None:
            continue
        family, n = got
        use = min(n, n_u)
        margins = family.read("margins", use)
        label = f"{cfg['method']} (imported)" + (f" [{cfg['name']}]" if cfg.get("name") else "")
        notes = {"imported_models": n, "scored_models": use}
        if n < n_u:
            notes["warning"] = f"{n} imported models against {n_u} in the other rows: KLoM's bias differs"
        rows.append({"method": label, "forget_set": forget_name,
                     **score(plan, forget_name, margins, lambda pts: None, labels),
                     "compute": None, "seconds_fraction": None, "amortized": None,
                     "hparams": {"imported": rec["id"], "source": cfg.get("source"), "sha256": cfg.get("sha256")},
                     "notes": notes})
    return rows


# ---------------------------------------------------------------------------------------- export
ARRAY_FORMS = (
    "prepare/labels/train | prepare/labels/val",
    "fit/<theta|theta_rows|bias|lds|lam|theta_logit|bias_logit>",
    "full/<margins|logits|accuracy>",
    "subset/[fit|heldout/]<margins|logits|accuracy|masks>",
    "oracle/<forget set>/<target|reference|eval>/<name>",
    "unlearn/<method>/<forget set>/<name>",
    "<kind>/<kind>-<id>/<path inside arrays.zarr>   (any stage, e.g. external/external-<id>/models/margins)",
)


def resolve_array(plan, spec: str):
    """(zarr array, rows to export, source description) for an --array spec (see ARRAY_FORMS)."""
    from pipeline.plan import FamilySpec, family_store

    parts = [p for p in spec.strip("/").split("/") if p]
    if len(parts) < 2:
        raise ExchangeError(f"--array {spec!r}: expected one of:\n  " + "\n  ".join(ARRAY_FORMS))
    store = plan.store
    kind = parts[0]
    if parts[1].startswith(f"{kind}-") and len(parts) >= 3:  # raw: a stage of any config in this store
        rel = f"{kind}/{parts[1]}"
        return _zarr_array(store, rel, "/".join(parts[2:]), spec), None, rel
    if kind == "prepare":
        return _zarr_array(store, plan.prepare.rel, "/".join(parts[1:]), spec), None, plan.prepare.rel
    if kind == "fit":
        if not is_complete(store, plan.fit):
            raise ExchangeError(f"--array {spec}: the fit stage {plan.fit.id} is not complete: run `oracle-farm fit`")
        name = "/".join(parts[1:])
        if name == "theta" and _has(store, plan.fit.rel, "theta_rows"):
            name = "theta_rows"  # the same values, chunked for row reads: export reads rows
        return _zarr_array(store, plan.fit.rel, name, spec), None, plan.fit.rel
    meta = plan.prepared_meta()
    t = plan.cfg.train
    if kind == "full":
        name = parts[-1]
        fam = FamilySpec(plan.full, "models", t.full.models, "full")
    elif kind == "subset":
        role = parts[1] if len(parts) == 3 else "fit"
        if role not in ("fit", "heldout"):
            raise ExchangeError(f"--array {spec}: subset roles are fit and heldout")
        name = parts[-1]
        fam = FamilySpec(plan.subset, role, t.subset.models if role == "fit" else t.subset.heldout, "subset",
                         alpha=t.subset.alpha, logits=t.subset.store_logits)
    elif kind == "oracle":
        if len(parts) != 4:
            raise ExchangeError(f"--array {spec}: expected oracle/<forget set>/<role>/<name>")
        _, fs, role, name = parts
        _forget(plan, fs, spec)
        if role not in ("target", "reference", "eval"):
            raise ExchangeError(f"--array {spec}: oracle roles are target, reference and eval")
        fam = FamilySpec(plan.oracle(fs), role, getattr(t.oracle, role), "oracle")
    elif kind == "unlearn":
        if len(parts) != 4:
            raise ExchangeError(f"--array {spec}: expected unlearn/<method>/<forget set>/<name>")
        _, method, fs, name = parts
        _forget(plan, fs, spec)
        return _unlearn_array(plan, method, fs, name, spec, meta)
    else:
        raise ExchangeError(f"--array {spec!r}: unknown stage {kind!r}; expected one of:\n  " + "\n  ".join(ARRAY_FORMS))
    family = family_store(plan, fam, meta)
    if fam.n_models == 0 or not family.done_mask(fam.n_models).all():
        done = int(family.done_mask(fam.n_models).sum()) if fam.n_models else 0
        raise ExchangeError(f"--array {spec}: {done}/{fam.n_models} models of {fam.ref.rel} ({fam.role}) are done: "
                            "run `oracle-farm train` first")
    return _zarr_array(store, fam.ref.rel, f"{fam.role}/{name}", spec), fam.n_models, fam.ref.rel


def _forget(plan, fs: str, spec: str) -> None:
    if fs not in plan.forget_sets:
        raise ExchangeError(f"--array {spec}: unknown forget set {fs!r}; known: {sorted(plan.forget_sets)}")


def _unlearn_array(plan, method: str, fs: str, name: str, spec: str, meta: dict):
    from pipeline.plan import chosen_point, method_grids, n_unlearned, unlearn_family, unlearn_ref

    grids = method_grids(plan.cfg)
    if method not in grids:
        raise ExchangeError(f"--array {spec}: method {method!r} is not in the config's unlearn.methods "
                            f"({sorted(grids)})")
    hp = chosen_point(plan, method, grids[method], fs)
    if hp is None:
        raise ExchangeError(f"--array {spec}: the grid of {method} has not been selected: run `oracle-farm unlearn`")
    ref = unlearn_ref(plan, method, hp, fs)
    n = n_unlearned(plan.cfg)
    if not unlearn_family(plan, ref, meta).done_mask(n).all():
        raise ExchangeError(f"--array {spec}: unlearn[{method},{fs}] is not complete: run `oracle-farm unlearn`")
    return _zarr_array(plan.store, ref.rel, f"models/{name}", spec), n, ref.rel


def _has(store: Store, rel: str, name: str) -> bool:
    try:
        return name in store.open_group(f"{rel}/arrays.zarr", mode="r")
    except FileNotFoundError:
        return False


def _zarr_array(store: Store, rel: str, path: str, spec: str):
    import zarr

    try:
        group = store.open_group(f"{rel}/arrays.zarr", mode="r")
    except FileNotFoundError:
        raise ExchangeError(f"--array {spec}: {store.url(rel)} holds no arrays") from None
    try:
        node = group[path]
    except KeyError:
        raise ExchangeError(f"--array {spec}: no array {path!r} in {store.url(rel)}/arrays.zarr; it holds "
                            f"{sorted(_array_paths(group))}") from None
    if not isinstance(node, zarr.Array):
        raise ExchangeError(f"--array {spec}: {path!r} is a group holding {sorted(_array_paths(node))}")
    return node


def _array_paths(group, prefix: str = "") -> list[str]:
    import zarr

    out = []
    for key, node in group.members():
        out += [f"{prefix}{key}"] if isinstance(node, zarr.Array) else _array_paths(node, f"{prefix}{key}/")
    return out


def chunk_rows(arr, chunk_rows: int | None = None) -> int:
    if chunk_rows:
        return max(1, int(chunk_rows))
    row_bytes = max(1, int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize)
    rows = max(1, _CHUNK_BYTES // row_bytes)
    c0 = arr.chunks[0] if arr.ndim else 1
    return rows // c0 * c0 if rows >= c0 else rows


LAYOUTS = ("long", "wide")


def array_dims(arr) -> tuple[str, ...]:
    """The array's dimension names (Zarr v3 metadata), or dim_0, dim_1, ... where it has none."""
    names = getattr(getattr(arr, "metadata", None), "dimension_names", None)
    return tuple(names) if names and all(names) else tuple(f"dim_{i}" for i in range(arr.ndim))


def export_array(arr, out: str | Path, n_rows: int | None = None, rows_per_chunk: int | None = None,
                 source: str = "", layout: str = "long") -> dict:
    """Write rows 0..n_rows of a stored array to .npy or .parquet (`layout`: see the module docstring),
    chunk by chunk. `source` is recorded in the Parquet metadata: keep it free of local paths."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise ExchangeError(f"--out {out}: expected a .npy or .parquet file name")
    if layout not in LAYOUTS:
        raise ExchangeError(f"--layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if arr.ndim == 0:
        raise ExchangeError(f"{source}: a 0-d array; nothing to chunk")
    n = arr.shape[0] if n_rows is None else min(int(n_rows), arr.shape[0])
    shape = (n, *arr.shape[1:])
    step = min(chunk_rows(arr, rows_per_chunk), max(1, n))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    chunks = 0
    try:
        if suffix == ".npy":
            mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=arr.dtype, shape=shape)
            for start in range(0, n, step):
                mm[start : start + step] = arr[start : min(n, start + step)]
                chunks += 1
            mm.flush()
            del mm
        else:
            name = getattr(arr, "basename", None) or "value"
            chunks = _write_parquet(arr, tmp, n, shape, step, source, layout, array_dims(arr), name)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "shape": list(shape), "dtype": str(arr.dtype), "chunks": chunks, "rows_per_chunk": step,
            "bytes": out.stat().st_size, "layout": layout if suffix == ".parquet" else None}


def export_forget_set(plan, name: str, out: str | Path) -> dict:
    """A forget set's sorted training indices to .npy or .parquet (column `train_point`)."""
    if name not in plan.forget_sets:
        raise ExchangeError(f"--forget-set {name!r}: unknown; the config's forget sets are {sorted(plan.forget_sets)}")
    from pipeline.data.forget_sets import forget_set_id

    indices = np.asarray(plan.forget_sets[name], dtype=np.int64)
    out = Path(out)
    if out.suffix.lower() not in (".npy", ".parquet"):
        raise ExchangeError(f"--out {out}: expected a .npy or .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        np.save(out, indices)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = {"oracle_farm": json.dumps({"forget_set": name, "forget_id": forget_set_id(indices),
                                           "shape": [len(indices)], "dtype": "int64", "dims": ["train_point"]})}
        pq.write_table(pa.table({"train_point": indices}).replace_schema_metadata(meta), out)
    return {"out": str(out), "shape": [len(indices)], "dtype": "int64", "bytes": out.stat().st_size}


def _chunk_table(rows: np.ndarray, start: int, layout: str, dims: tuple, name: str):
    """One chunk of rows (start..start+len) as a pyarrow table of the layout."""
    import pyarrow as pa

    if rows.ndim == 1:
        return pa.table({dims[0]: np.arange(start, start + len(rows), dtype=np.int64), name: rows})
    if layout == "wide":
        columns = {dims[0]: np.arange(start, start + len(rows), dtype=np.int64)}
        flat = rows.reshape(len(rows), -1)
        for j, label in enumerate(_wide_names(rows.shape[1:], dims[1:])):
            columns[label] = flat[:, j]
        return pa.table(columns)
    grid = np.indices(rows.shape, dtype=np.int64).reshape(rows.ndim, -1)
    grid[0] += start
    return pa.table({**{d: grid[k] for k, d in enumerate(dims)}, name: rows.reshape(-1)})


def _wide_names(tail: tuple, dims: tuple) -> list[str]:
    return ["_".join(f"{d}_{i}" for d, i in zip(dims, idx)) for idx in np.ndindex(*tail)]


def _write_parquet(arr, tmp: Path, n: int, shape: tuple, step: int, source: str, layout: str, dims: tuple,
                   name: str) -> int:
    import pyarrow.parquet as pq

    meta = {"oracle_farm": json.dumps({"shape": list(shape), "dtype": str(arr.dtype), "dims": list(dims),
                                       "layout": layout, "name": name, "source": source})}
    writer = None
    chunks = 0
    try:
        for start in range(0, n, step):
            table = _chunk_table(np.ascontiguousarray(arr[start : min(n, start + step)]), start, layout, dims, name)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(meta))
            writer.write_table(table.replace_schema_metadata(meta), row_group_size=max(1, table.num_rows))
            chunks += 1
    finally:
        if writer is not None:
            writer.close()
    return chunks


def read_parquet_array(path: str | Path) -> np.ndarray:
    """An array written by `export_array` to Parquet, rebuilt (whole, in memory)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[b"oracle_farm"])
    shape, dtype = tuple(meta["shape"]), np.dtype(meta["dtype"])
    if len(shape) > 1 and meta["layout"] == "wide":
        columns = [table.column(c).to_numpy() for c in table.column_names[1:]]
        return np.stack(columns, axis=1).astype(dtype).reshape(shape)
    return table.column(meta["name"]).to_numpy().astype(dtype).reshape(shape)


def warn(lines: list[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)
