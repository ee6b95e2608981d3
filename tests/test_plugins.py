"""Methods as plugins (decision 37): resolution by entry point and `module:attr`, the errors a bad plugin
gives (exit 2 before any work, naming it), the provider in the stage identity, the per-member adapter's
exactness, and the example package installed and run through `oracle-farm run` on the tiny config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import CLI, REPO, TINY, copy_store, tiny_plan

from pipeline.config import ConfigError, DataConfig, ModelConfig
from pipeline.data.datasets import load_dataset
from pipeline.data.device import DeviceData
from pipeline.models import build_model
from pipeline.unlearn import MethodError, method_provider, resolve
from pipeline.unlearn.adapter import MemberModel, Examples, member_of, per_member
from pipeline.unlearn.base import ComputeMeter, Context
from pipeline.unlearn.hparams import MethodConfig

EXAMPLE = REPO / "examples" / "method_plugin"
PLUGIN_SOURCE = '''
from pipeline.unlearn import Method
from pipeline.unlearn.hparams import MethodConfig
from pydantic import BaseModel, Field

class Cfg(MethodConfig):
    lr: float = Field(0.1, gt=0)

def run(ctx, model, forget, retain, cfg, meter):
    raise AssertionError("not run here")

good = Method(Config=Cfg, run=run)
no_config = Method(Config=dict, run=run)
loose = Method(Config=type("Loose", (BaseModel,), {"__annotations__": {"lr": float}, "lr": 0.1}), run=run)
odd_needs = Method(Config=Cfg, run=run, NEEDS=("gpus",))
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "my_plugin.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("my_plugin", "broken_plugin"):
        sys.modules.pop(name, None)
    resolve.cache_clear()


# ------------------------------------------------------------------------------------------ resolution
@pytest.mark.parametrize("name, words", [
    ("no_such_method", ["unknown method 'no_such_method'", "module:attr"]),
    ("broken_plugin:method", ["'broken_plugin:method'", "cannot be imported", "no_such_dependency"]),
    ("my_plugin:missing", ["has no attribute 'missing'"]),
    ("my_plugin:no_config", ["is not a method", "Config"]),
    ("my_plugin:loose", ["forbid unknown fields"]),
    ("my_plugin:odd_needs", ["NEEDS", "gpus"]),
])
def test_a_bad_plugin_is_a_config_error_naming_it(plugin_dir, name, words):
    with pytest.raises(MethodError) as caught:
        resolve(name)
    for word in words:
        assert word in str(caught.value), str(caught.value)
    cfg = tiny_plan(plugin_dir / "store", f"unlearn.methods={{'{name}': {{}}}}").cfg
    from pipeline.plan import method_grids

    with pytest.raises(ConfigError, match=f"unlearn.methods.{name}"):
        method_grids(cfg)


def test_plugin_hyperparameters_are_validated_like_a_builtins(plugin_dir):
    from pipeline.plan import method_grids

    cfg = tiny_plan(plugin_dir / "store", "unlearn.methods={'my_plugin:good': {lr: [0.1, 0.2]}}").cfg
    assert [hp.lr for hp in method_grids(cfg)["my_plugin:good"]] == [0.1, 0.2]
    for bad, word in (("{lr: -1}", "lr"), ("{lrr: 1}", "lrr")):
        cfg = tiny_plan(plugin_dir / "store", f"unlearn.methods={{'my_plugin:good': {bad}}}").cfg
        with pytest.raises(ConfigError, match=f"unlearn.methods.my_plugin:good.{word}"):
            method_grids(cfg)


def test_the_stage_identity_names_the_provider(plugin_dir, tiny_store):
    """A built-in's identity is what it was (no provider); a module outside any distribution is
    identified by its source's sha256, so an edit makes a new stage."""
    from pipeline.config import stage_id
    from pipeline.plan import unlearn_ref

    plan = tiny_plan(tiny_store.root)
    hp = resolve("finetune").method.Config()
    assert method_provider("finetune") is None
    ref = unlearn_ref(plan, "finetune", hp, "random10")
    upstream_free = {"method": "finetune", "hparams": hp.model_dump(mode="json")}
    assert ref.id != stage_id("unlearn", upstream_free)  # upstream ids are in it too, as before
    provider = method_provider("my_plugin:good")
    assert provider["module"] == "my_plugin" and len(provider["sha256"]) == 64
    before = unlearn_ref(plan, "my_plugin:good", resolve("my_plugin:good").method.Config(), "random10").id
    (plugin_dir / "my_plugin.py").write_text(PLUGIN_SOURCE + "\n# edited\n")
    sys.modules.pop("my_plugin")
    resolve.cache_clear()
    after = unlearn_ref(plan, "my_plugin:good", resolve("my_plugin:good").method.Config(), "random10").id
    assert before != after


def test_a_failure_inside_a_ray_task_reads_as_its_cause():
    """A worker's bad-input error (say a plugin that imports in the driver but not on a worker) exits
    2 with the cause's message: no Ray traceback, no ANSI codes."""
    import typer
    from ray.exceptions import RayTaskError

    from pipeline.cli.common import _guard, err

    cause = MethodError("method 'x:y' (module:attr) cannot be imported: ModuleNotFoundError: No module named 'x'")
    wrapped = RayTaskError("unlearn_block_task", "\x1b[36mTraceback ...\x1b[0m", cause).as_instanceof_cause()

    def fail():
        raise wrapped

    with err.capture() as captured, pytest.raises(typer.Exit) as code:
        _guard(fail)
    assert code.value.exit_code == 2
    text = captured.get()
    assert "No module named 'x'" in text and "Traceback" not in text and "\x1b" not in text and text.count("error") == 1


# ------------------------------------------------------------------------------------------ the adapter
class NoisyCfg(MethodConfig):
    lr: float = 0.05
    epochs: int = 2


def noisy_descent(model, forget, retain, cfg, member):
    """Draws from both of the member's streams (numpy batches, a torch DataLoader shuffle and noise)
    and trains BatchNorm in train mode, so that any sharing between members would show."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    loader = torch.utils.data.DataLoader(retain, batch_size=32, shuffle=True, generator=member.generator)
    for _ in range(cfg.epochs):
        for (x, y), (xf, yf) in zip(loader, forget.batches(8, member.rng)):
            noise = torch.randn(x.shape, generator=member.generator).to(x.device) * 0.01
            loss = F.cross_entropy(model(x + noise), y) - 0.1 * F.cross_entropy(model(xf), yf)
            opt.zero_grad()
            loss.backward()
            opt.step()
            member.meter.train_pass(len(y) + len(yf))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_adapter_on_a_stack_equals_the_function_on_each_member_alone():
    ds = load_dataset(DataConfig())
    mean, std = ds.channel_stats()
    data = DeviceData(ds.train_x, ds.train_y, ds.val_x, ds.val_y, mean, std)
    forget = np.arange(5, 200, 9)
    retain = np.setdiff1d(np.arange(300), forget)
    cfg_model, indices, seeds = ModelConfig(name="cnn", hidden=4), [3, 5, 8], [31, 32, 33]
    method = per_member(noisy_descent, NoisyCfg)

    def ctx(model_indices):
        return Context(data=data, classes=10, seed=7, model_indices=list(model_indices))

    stack = build_model(cfg_model, seeds, data.shape, 10)
    meter = ComputeMeter()
    out = method.run(ctx(indices), stack, forget, retain, NoisyCfg(), meter)
    got = _state(out.model)
    assert meter.backward > 0
    for k, (index, seed) in enumerate(zip(indices, seeds)):
        alone = MemberModel(build_model(cfg_model, [seed], data.shape, 10))
        member = member_of(ctx([index]), index)
        noisy_descent(alone, Examples(data, forget), Examples(data, retain), NoisyCfg(), member)
        for name, value in _state(alone.stack).items():
            assert torch.equal(got[name][k], value[0]), (k, name)
        assert member.meter.backward == meter.backward
    untouched = build_model(cfg_model, seeds, data.shape, 10).state_dict()
    assert not torch.equal(got["fc.weight"], untouched["fc.weight"])


# ------------------------------------------------------------------------------------------ installed, end to end
@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """The example package installed as pip installs any package (a wheel built from a copy of its
    source), into a folder of its own put on PYTHONPATH: the shared venv stays as it was, and the Ray
    workers the CLI starts inherit the path."""
    tmp = tmp_path_factory.mktemp("plugin")
    shutil.copytree(EXAMPLE, tmp / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(tmp / "site"), str(tmp / "src")], check=True, capture_output=True, timeout=300)
    return tmp / "site"


def _cli(site, *args, timeout=600):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_an_installed_plugin_runs_through_oracle_farm_run(installed_plugin, tiny_finished, tmp_path):
    root = copy_store(tiny_finished["root"], tmp_path / "store")
    methods = "unlearn.methods={do_nothing: {}, plain_ga: {lr: 0.01, epochs: 1}, 'oracle_farm_example:method': {epochs: 1}}"
    proc = _cli(installed_plugin, "run", str(TINY), "--set", f"store={root}", "--set", methods,
                "--set", "evaluate.bootstrap=0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((root / "reports" / "tiny" / "report.json").read_text())["rows"]
    assert {"plain_ga", "oracle_farm_example:method"} <= {r["method"] for r in rows}
    listed = _cli(installed_plugin, "status", str(TINY), "--set", f"store={root}", "--set", methods, "--json")
    unlearn = [r for r in json.loads(listed.stdout) if r["section"] == "unlearn"]
    assert {r["method"] for r in unlearn if r["state"] == "done"} >= {"plain_ga", "oracle_farm_example:method"}


def test_an_unknown_or_broken_plugin_exits_2_before_any_work(installed_plugin, tmp_path):
    (tmp_path / "half_plugin.py").write_text(textwrap.dedent("raise RuntimeError('half written')\n"))
    for name, word in (("plain_gx", "did you mean 'plain_ga'"), ("half_plugin:method", "half written")):
        root = tmp_path / f"store-{name.replace(':', '-')}"
        proc = _cli(f"{installed_plugin}{os.pathsep}{tmp_path}", "run", str(TINY), "--set", f"store={root}",
                    "--set", f"unlearn.methods={{'{name}': {{}}}}", timeout=120)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert name in proc.stderr and word in proc.stderr, proc.stderr
        assert "\x1b" not in proc.stderr and "Traceback" not in proc.stderr
        assert not root.exists()
