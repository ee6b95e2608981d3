"""Fixtures shared by the whole test run (decision 20).

`tiny_store` prepares and trains `configs/tiny.yaml` once, in a temporary store, through the real stages
and a real local Ray instance; `tiny_finished` runs every stage and the report on a copy of it. Tests
that need such a store read it, and tests that change a store work on a copy. Ray is shut down at the
end of the session.

Ray is kept on the loopback interface: Ray resolves a `127.0.0.1` node address to the machine's routable
address and its gRPC servers then listen on every interface, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
which makes a local instance (and everything it starts) bind and advertise 127.0.0.1 only. Set here, it
also reaches every `oracle-farm` and `ray` subprocess the tests start.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # bind local Ray instances to 127.0.0.1 only
os.environ.pop("RAY_ADDRESS", None)  # never join a cluster that happens to be named in the environment
os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

from helpers import TINY, TinyStore, copy_store, tiny_plan  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def ray_session():
    """Whatever started Ray in this process, stop it when the session ends."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, ray_session) -> TinyStore:
    """configs/tiny.yaml prepared and trained (every family) once, in a store shared by the whole run.
    Read-only for tests: copy it (`helpers.copy_store`) before changing anything."""
    from pipeline.stages.prepare import run_prepare
    from pipeline.stages.train import run_train

    root = tmp_path_factory.mktemp("tiny-store")
    plan = tiny_plan(root)
    run_prepare(plan)
    run_train(plan)
    return TinyStore(root=root, plan=plan)


@pytest.fixture(scope="session")
def tiny_finished(tiny_store, tmp_path_factory) -> dict:
    """configs/tiny.yaml through every stage (`run_all`: fit, unlearn with its grid selection, report),
    on a copy of `tiny_store`: {"root", "plan", "out" (the report folder)}. Read-only for tests that
    do not restore what they change."""
    from pipeline.stages.run import run_all

    root = copy_store(tiny_store.root, tmp_path_factory.mktemp("run") / "store")
    plan = tiny_plan(root)
    out = run_all(plan)
    return {"root": root, "plan": plan, "out": out}


@pytest.fixture(scope="session")
def tiny_config_path():
    return TINY
