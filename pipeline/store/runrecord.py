"""The record a finished `oracle-farm run` leaves beside its report, so that a re-run of the same config
can tell it has nothing to do without importing torch or Ray (they take seconds to import).

The record holds the run's key (the whole config but its execution settings) and a fingerprint of the
completion state of every stage the run produced: for each stage, its record, its completion marker and
the names of its block markers; the selection records; the imported families. A re-run whose key and
fingerprint match, with the report still in place, is finished. Anything else (another config, a stage
removed by `gc`, a family grown or a block marker deleted, a missing report) takes the full path, which
skips finished work block by block as always. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.config import Config, stage_id
from pipeline.store import Store

RECORD = "RUN.json"


def report_dir(cfg: Config) -> str:
    return f"reports/{cfg.name}"


def report_path(cfg: Config, store: Store, out_dir: str | Path | None = None) -> Path:
    if out_dir:
        return Path(out_dir)
    return Path(store.path(report_dir(cfg))) if store.is_local else Path("report") / cfg.name


def run_key(cfg: Config) -> str:
    return stage_id("run", cfg.model_dump(mode="json", exclude={"execution"}))


def fingerprint(store: Store, stage_rels: list[str], file_rels: list[str]) -> str:
    """Hash of what says these stages are complete: records, markers and the listed files."""
    state = {"external": sorted(store.list("external"))}
    for rel in stage_rels:
        markers = store.find(f"{rel}/markers")
        state[rel] = [store.exists(f"{rel}/stage.json"), store.exists(f"{rel}/COMPLETE.json"), markers]
    for rel in file_rels:
        state[rel] = store.exists(rel)
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def write_record(cfg: Config, store: Store, out_dir: str | Path | None, report_key: str,
                 stage_rels: list[str], file_rels: list[str]) -> None:
    """Written last, after the report: a run killed before this point is never taken as finished."""
    record = {"run_key": run_key(cfg), "report_key": report_key, "stages": sorted(stage_rels),
              "files": sorted(file_rels), "fingerprint": fingerprint(store, stage_rels, file_rels)}
    path = report_path(cfg, store, out_dir) / RECORD
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)


def finished_run(cfg: Config, store: Store, out_dir: str | Path | None = None) -> Path | None:
    """The report folder when the run of this config is finished and nothing it read has changed."""
    out = report_path(cfg, store, out_dir)
    try:
        record = json.loads((out / RECORD).read_text())
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if record.get("run_key") != run_key(cfg) or report.get("key") != record.get("report_key"):
        return None
    if not (out / "report.md").exists():
        return None
    try:
        current = fingerprint(store, record["stages"], record["files"])
    except Exception:  # noqa: BLE001 - an unreachable store: the full path reports it properly
        return None
    return out if current == record["fingerprint"] else None
