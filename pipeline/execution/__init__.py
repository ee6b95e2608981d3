"""The orchestration layer: Ray, kept thin: start or join a cluster, run a list of tasks, report progress.
The stages run their work through it; `pipeline.execution.gate` lets tests hold a task at its start."""

from __future__ import annotations

import logging
import os

import ray

from pipeline.config import ExecutionConfig
from pipeline.progress import Progress


# Store settings a joined cluster's workers need to reach the same store as the driver. Only where the
# store is and how patiently to call it (pipeline.store.s3_client_config), never who may read it:
# secrets (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) are not copied into the runtime_env, which Ray keeps in its job table and shows
# on the dashboard; a cluster's nodes get them from their own environment (infra/cluster.yaml,
# infra/rayjob.yaml), as do per-node settings (AWS_PROFILE names files on the node, ORACLE_FARM_CACHE
# a local folder). A local instance started here inherits this process's whole environment.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "ORACLE_FARM_S3_ATTEMPTS", "ORACLE_FARM_S3_TIMEOUT")


# Every worker hashes strings the same way, whichever process runs a task.
WORKER_HASH_SEED = {"PYTHONHASHSEED": "0"}


def worker_env() -> dict[str, str]:
    """What a joined cluster's workers get through the job's runtime_env. A local instance takes its
    workers' environment from this process instead (`init_ray`): a runtime_env would have Ray start
    fresh workers for the first tasks instead of the ones it started with the instance (1 s)."""
    return {**WORKER_HASH_SEED, **{k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}}


class _DropNotice(logging.Filter):
    """Drops one informational record of Ray's by its text; every other record passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


# Ray >= 2.5x logs, as a WARNING, that a local instance enabled token authentication, the default it
# chose (it does not when RAY_AUTH_MODE is set): a notice, not a problem, shown on every run. Dropped
# here by its text; Ray's other warnings (e.g. that authentication is *disabled*) still reach the user.
_RAY_NOTICES = {"ray._private.authentication.authentication_token_setup":
                "Token authentication is enabled for this Ray cluster"}


def _quiet_ray_notices() -> None:
    for name, prefix in _RAY_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(prefix))


def init_ray(cfg: ExecutionConfig) -> None:
    """Join RAY_ADDRESS / execution.ray_address when given, else start a local instance on 127.0.0.1."""
    if ray.is_initialized():
        return
    _quiet_ray_notices()
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": worker_env()}, log_to_driver=True)
    else:
        _bind_local_instance_to_loopback()
        os.environ.update(WORKER_HASH_SEED)  # the instance's processes inherit it (as do this process's later children)
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=None if cfg.device == "cuda" else 0,
                 include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True,
                 configure_logging=False)


def _bind_local_instance_to_loopback() -> None:
    """Ray 2.x resolves 127.0.0.1 to the machine's routable address and listens on every interface
    unless cluster mode is off; a local instance must stay on the loopback interface."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # for the processes Ray starts
    from ray._private import ray_constants

    if hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # the driver read the variable at import time
        ray_constants.ENABLE_RAY_CLUSTER = False


def task_options(cfg: ExecutionConfig, gpu: bool = True) -> dict:
    """Ray options of a task; gpu=False for work that reads and scores on the CPU (report rows, figures)."""
    return {"num_cpus": cfg.threads, "num_gpus": cfg.num_gpus if gpu and cfg.device == "cuda" else 0,
            "max_retries": cfg.max_retries, "retry_exceptions": False}


class TaskLost(RuntimeError):
    """A task was lost with its worker or its node (killed, preempted, out of memory) after the retries
    `execution.max_retries` allows: not an error of the task's own (exit 1). What it had not marked is
    redone by a re-run of the same command."""


# Ray's errors for work lost with a worker process or a node, as opposed to an exception a task raised
# (which `ray.get` re-raises as itself, so a StoreError in a task is still a StoreError here).
_LOST = (ray.exceptions.NodeDiedError, ray.exceptions.WorkerCrashedError, ray.exceptions.LocalRayletDiedError,
         ray.exceptions.ObjectLostError)


def _lost(label: str, name: str | None, exc: Exception, done: int, total: int, unit: str) -> TaskLost:
    what = f"the task of {name}" if name else "a task"
    said = ". ".join(" ".join(str(exc).split()).split(". ")[:2])[:300]  # Ray's first two sentences: what, where
    return TaskLost(f"{label}: {what} was lost with its worker or node after its retries "
                    f"(execution.max_retries): {type(exc).__name__}: {said}; {done} of this run's {total} "
                    f"{unit} were finished and marked: re-run the same command to redo the rest")


def run_tasks(label: str, refs_with_weight: list[tuple], total: int, unit: str = "models") -> list:
    """Wait for Ray object refs, each worth `weight` units of progress (a tuple (ref, weight) or
    (ref, weight, name), the name used where the task is lost); re-raise the first failure of a task's
    own, and raise TaskLost, naming the task, for one lost with its worker or node."""
    progress = Progress(label, total, unit)
    weights = {entry[0]: entry[1] for entry in refs_with_weight}
    names = {entry[0]: entry[2] for entry in refs_with_weight if len(entry) > 2}
    pending = list(weights)
    done, results = 0, {}
    progress.update(0)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
        for ref in ready:
            try:
                results[ref] = ray.get(ref)
            except _LOST as exc:
                raise _lost(label, names.get(ref), exc, done, total, unit) from None
            done += weights[ref]
        progress.update(done)
    progress.close()
    return [results[entry[0]] for entry in refs_with_weight]


def run_streaming_tasks(label: str, generators: list, total: int, unit: str = "models",
                        names: list[str] | None = None) -> int:
    """Wait for Ray generator tasks (``num_returns="streaming"``) that yield the units they have done
    as they go, so that progress moves within a task; re-raise the first failure (TaskLost, naming the
    task, for one lost with its worker or node). Returns the units done."""
    progress = Progress(label, total, unit)
    pending = list(generators)
    named = dict(zip(map(id, generators), names or []))
    done = 0
    progress.update(0)
    while pending:
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        for gen in ready:
            try:
                done += ray.get(next(gen))
            except StopIteration:
                pending.remove(gen)
            except _LOST as exc:
                raise _lost(label, named.get(id(gen)), exc, done, total, unit) from None
        progress.update(done)
    progress.close()
    return done
