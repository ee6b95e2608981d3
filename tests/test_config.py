"""Config validation (messages name the YAML path; misspelled keys get the closest valid name), `--set`
overrides validated the same way, and stage identities (decisions 13 and 15)."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml

from helpers import TINY, tiny_plan
from pipeline.config import SCHEMA_VERSION, Config, ConfigError, load_config, parse_config, stage_id


def error_of(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return str(info.value)


def override_error(*items: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(TINY, list(items))
    return str(info.value)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"epocs": 3}}, "train.epocs: unknown key (did you mean 'epochs'?)"),
        ({"modle": {"name": "mlp"}}, "modle: unknown key (did you mean 'model'?)"),
        ({"train": {"subset": {"alpah": 0.3}}}, "train.subset.alpah: unknown key (did you mean 'alpha'?)"),
        ({"data": {"synthetic": {"n_trian": 5}}}, "data.synthetic.n_trian: unknown key (did you mean 'n_train'?)"),
        ({"forget_sets": [{"name": "a", "kind": "random", "size": 3, "sede": 1}]},
         "forget_sets[0].sede: unknown key (did you mean 'seed'?)"),
        ({"forget_sets": [{"name": "a", "kind": "indices", "indices": [1], "fiel": "x.npy"}]},
         "forget_sets[0].fiel: unknown key (did you mean 'file'?)"),
        ({"tuning_forget_sets": [{"name": "t", "kind": "class", "class_id": 3, "fracton": 0.5}]},
         "tuning_forget_sets[0].fracton: unknown key (did you mean 'fraction'?)"),
    ],
)
def test_unknown_key_names_the_closest_valid_key(raw, expected):
    assert expected in error_of(raw)


def test_unknown_key_without_a_close_name_lists_the_valid_keys():
    msg = error_of({"model": {"zzzzzz": 1}})
    assert "model.zzzzzz: unknown key; valid: name, hidden, width" in msg


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"epochs": "three"}}, "train.epochs: must be a valid integer"),
        ({"model": {"name": "transformer"}}, "model.name: must be 'mlp', 'cnn' or 'resnet9', got 'transformer'"),
        ({"train": {"lr": "fast"}}, "train.lr: must be a valid number"),
        ({"train": 5}, "train: must be a valid dictionary"),
        ({"data": {"dataset": "mnist"}}, "data.dataset: must be 'digits', 'cifar10' or 'synthetic', got 'mnist'"),
        ({"forget_sets": [{"name": "a", "kind": "indices", "indices": [1.5]}]},
         "forget_sets[0].indices[0]: must be a valid integer"),
        ({"forget_sets": [{"name": "a", "kind": "randm", "size": 3}]}, "forget_sets[0]: Input tag 'randm'"),
    ],
)
def test_wrong_type_names_the_field_and_the_value(raw, expected):
    assert expected in error_of(raw)


@pytest.mark.parametrize("alpha", [1.5, 1.0, 0.0, -0.2])
def test_subset_alpha_outside_the_open_unit_interval(alpha):
    assert f"train.subset.alpha: must be in (0, 1), got {alpha}" in error_of({"train": {"subset": {"alpha": alpha}}})


def test_subset_alpha_exact_message():
    assert error_of({"train": {"subset": {"alpha": 1.5}}}).splitlines()[1].strip() == \
        "train.subset.alpha: must be in (0, 1), got 1.5"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"full": {"models": -1}}}, "train.full.models: must be >= 0, got -1"),
        ({"train": {"subset": {"heldout": -3}}}, "train.subset.heldout: must be >= 0, got -3"),
        ({"train": {"oracle": {"eval": -2}}}, "train.oracle.eval: must be >= 0, got -2"),
        ({"train": {"epochs": 0}}, "train.epochs: must be > 0, got 0"),
        ({"execution": {"block_size": 0}}, "execution.block_size: must be > 0, got 0"),
        ({"forget_sets": [{"name": "a", "kind": "random", "size": -5}]},
         "forget_sets[0].size: must be > 0, got -5"),
    ],
)
def test_negative_counts(raw, expected):
    assert expected in error_of(raw)


def test_every_error_is_reported_at_once():
    msg = error_of({"train": {"epochs": 0, "epocs": 2}, "model": {"name": "x"}})
    assert "train.epochs" in msg and "train.epocs" in msg and "model.name" in msg


def test_indices_forget_set_needs_exactly_one_source():
    assert "forget_sets[0]: give exactly one of `indices` or `file`" in error_of(
        {"forget_sets": [{"name": "a", "kind": "indices"}]})


def test_forget_set_names_are_unique():
    msg = error_of({"forget_sets": [{"name": "a", "kind": "random", "size": 3}],
                    "tuning_forget_sets": [{"name": "a", "kind": "random", "size": 4}]})
    assert "forget set names must be unique" in msg and "'a'" in msg


def test_config_is_frozen():
    cfg = load_config(TINY)
    with pytest.raises(Exception):
        cfg.train.epochs = 7


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    bad.write_text(f"source: {TINY}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid config"):  # the message names the file
        load_config(bad)


# ------------------------------------------------------------------------------------------ --set
def test_overrides_apply_and_parse_values_as_yaml():
    cfg = load_config(TINY, ["train.epochs=7", "fit.estimator=ridge", "name=a=b",
                             "forget_sets=[{name: x, kind: indices, indices: [3, 1]}]", "unlearn.models=null"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.fit.estimator == "ridge"  # a section absent from the file is created
    assert cfg.name == "a=b"  # only the first '=' splits
    assert cfg.forget_sets[0].indices == [3, 1]
    assert cfg.unlearn.models is None


@pytest.mark.parametrize(
    "item, expected",
    [
        ("train.subset.alpha=1.5", "train.subset.alpha: must be in (0, 1), got 1.5"),
        ("train.epocs=3", "train.epocs: unknown key (did you mean 'epochs'?)"),
        ("train.epochs=three", "train.epochs: must be a valid integer"),
        ("train.full.models=-1", "train.full.models: must be >= 0, got -1"),
        ("model.name=transformer", "model.name: must be 'mlp', 'cnn' or 'resnet9'"),
        ("train.epochs", "expected KEY=VALUE"),
        ("train.epochs.x=1", "epochs is not a section"),
        ("train.epochs=[1", "not valid YAML"),
    ],
)
def test_overrides_are_validated_like_the_file(item, expected):
    msg = override_error(item)
    assert expected in msg
    assert msg.startswith((f"{TINY}: invalid config", "override "))  # names the file or the override


def test_override_and_file_give_the_same_config(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    raw["train"]["epochs"] = 9
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path) == load_config(TINY, ["train.epochs=9"])


# ------------------------------------------------------------------------------------------ identity
def ids(root, *overrides: str) -> dict[str, str]:
    return {label: ref.id for label, ref in tiny_plan(root, *overrides).all_stage_refs()}


TRAINED = ("full", "subset", "oracle[random10]", "oracle[tune]")


def test_stage_id_golden():
    """The hashing scheme itself: pinned, so a change to it (which orphans every stored stage) is deliberate.
    Update together with SCHEMA_VERSION."""
    assert SCHEMA_VERSION == 1
    assert stage_id("full", {"a": 1, "b": [1, 2]}, {"prepare": "x"}) == "c720d766bb0b5ff1"
    payload = {"schema": 1, "kind": "full", "config": {"a": 1, "b": [1, 2]}, "upstream": {"prepare": "x"}}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    assert hashlib.sha256(canonical.encode()).hexdigest()[:16] == "c720d766bb0b5ff1"


def test_stage_id_ignores_key_order_and_names_kind_and_upstream():
    a = stage_id("full", {"x": 1, "y": {"p": 1, "q": 2}}, {"prepare": "1"})
    assert a == stage_id("full", {"y": {"q": 2, "p": 1}, "x": 1}, {"prepare": "1"})
    assert a != stage_id("subset", {"x": 1, "y": {"p": 1, "q": 2}}, {"prepare": "1"})
    assert a != stage_id("full", {"x": 1, "y": {"p": 1, "q": 2}}, {"prepare": "2"})
    assert len(a) == 16 and int(a, 16) >= 0


def test_same_config_twice_gives_the_same_ids(tmp_path):
    first = ids(tmp_path / "a")
    assert first == ids(tmp_path / "a")
    assert first == ids(tmp_path / "b")  # the store root is not part of any identity
    assert set(first) == {"prepare", "full", "subset", "oracle[random10]", "oracle[tune]", "fit"}
    assert len(set(first.values())) == len(first)  # oracle ids differ between forget sets


def test_defaults_are_part_of_the_identity(tmp_path):
    """Writing a default out gives the same ids as leaving it out (defaults are hashed, not omitted)."""
    assert ids(tmp_path, "train.momentum=0.9", "train.augment=false", "data.split_seed=0") == ids(tmp_path)


def test_adding_a_forget_set_changes_no_other_identity(tmp_path):
    base = ids(tmp_path)
    more = ids(tmp_path, "forget_sets=[{name: random10, kind: random, size: 10, seed: 0},"
                         " {name: class3, kind: class, class_id: 3, size: 20}]")
    assert set(more) == set(base) | {"oracle[class3]"}
    assert {k: more[k] for k in base} == base


def test_oracle_identity_is_the_forget_sets_content_not_its_name(tmp_path):
    renamed = ids(tmp_path, "forget_sets=[{name: other-name, kind: random, size: 10, seed: 0}]")
    assert renamed["oracle[other-name]"] == ids(tmp_path)["oracle[random10]"]
    plan = tiny_plan(tmp_path)
    indices = plan.forget_sets["random10"].tolist()
    as_indices = ids(tmp_path, f"forget_sets=[{{name: r, kind: indices, indices: {indices[::-1]}}}]")
    assert as_indices["oracle[r]"] == ids(tmp_path)["oracle[random10]"]


@pytest.mark.parametrize(
    "override",
    ["train.full.models=100", "train.oracle.target=7", "train.oracle.reference=1", "train.oracle.eval=64",
     "execution.block_size=3", "execution.num_cpus=1", "execution.threads=2", "execution.max_retries=0",
     "execution.device=cuda", "execution.num_gpus=0.5", "execution.fit_block_targets=7", "execution.data_path=stream",
     "name=renamed"],
)
def test_family_sizes_and_execution_settings_change_no_identity(tmp_path, override):
    assert ids(tmp_path, override) == ids(tmp_path)


def test_subset_size_changes_only_the_fit_that_consumes_it(tmp_path):
    base = ids(tmp_path)
    for override in ("train.subset.models=999", "train.subset.heldout=3"):
        changed = ids(tmp_path, override)
        assert {k: v for k, v in changed.items() if k != "fit"} == {k: v for k, v in base.items() if k != "fit"}
        assert changed["fit"] != base["fit"]


@pytest.mark.parametrize("override", ["train.epochs=5", "train.lr=0.1", "train.precision=bf16",
                                      "train.augment=true", "model.hidden=33", "train.batch_size=32"])
def test_recipe_changes_re_identify_every_trained_family(tmp_path, override):
    base, changed = ids(tmp_path), ids(tmp_path, override)
    assert changed["prepare"] == base["prepare"]
    for label in (*TRAINED, "fit"):
        assert changed[label] != base[label], label


def test_alpha_changes_the_subset_family_only(tmp_path):
    base, changed = ids(tmp_path), ids(tmp_path, "train.subset.alpha=0.3")
    assert [k for k in base if base[k] != changed[k]] == ["subset", "fit"]


def test_data_changes_re_identify_everything(tmp_path):
    base, changed = ids(tmp_path), ids(tmp_path, "data.val_fraction=0.25")
    assert all(changed[k] != base[k] for k in base)


def test_unset_lasso_options_stay_out_of_the_fit_identity(tmp_path):
    """path_tol and patience, when unset, are not in the fit's recorded section (fits stored before they
    existed keep their ids); set, they re-identify the fit and nothing else."""
    assert not {"path_tol", "patience"} & set(tiny_plan(tmp_path).cfg.fit.section()["lasso"])
    base = ids(tmp_path)
    for override in ("fit.lasso.path_tol=0.01", "fit.lasso.patience=2"):
        changed = ids(tmp_path, override)
        assert [k for k in base if base[k] != changed[k]] == ["fit"], override


def test_later_stage_settings_do_not_re_identify_training(tmp_path):
    base = ids(tmp_path)
    changed = ids(tmp_path, "fit.estimator=ridge", "evaluate.bins=30", "unlearn.seed=4")
    assert [k for k in base if base[k] != changed[k]] == ["fit"]


def test_cifar_folder_location_is_not_part_of_the_prepare_identity(tmp_path):
    from pipeline.plan import Plan
    from pipeline.store import Store

    def prepare_id(root: str) -> str:
        cfg = Config.model_validate({"data": {"dataset": "cifar10", "root": root}, "store": str(tmp_path)})
        return Plan(cfg, Store(cfg.store)).prepare.id

    assert prepare_id("/data/a") == prepare_id("/elsewhere/b")


# ------------------------------------------------------------------------------------------ paper configs
REPO_CONFIGS = TINY.parent


@pytest.mark.parametrize("name", ["cifar10.yaml", "cifar10-smoke.yaml"])
def test_cifar10_configs_run_every_registered_method(name):
    from pipeline.unlearn import METHODS, expand_grid

    cfg = load_config(REPO_CONFIGS / name)
    assert set(cfg.unlearn.methods) == set(METHODS)
    for method, params in cfg.unlearn.methods.items():
        assert expand_grid(method, params), method


def test_cifar10_config_holds_the_papers_settings():
    from pipeline.unlearn import expand_grid

    methods = load_config(REPO_CONFIGS / "cifar10.yaml").unlearn.methods
    grid = {name: expand_grid(name, params) for name, params in methods.items()}
    assert all(p.budget == 0.3 and p.epochs == 30 for p in grid["del"])
    assert any(p.n_iters == 1500 and p.forget_freq == 5 and p.forget_alpha == 25 and p.max_norm == 7
               for p in grid["sfron"])
    assert any(p.epochs == 10 and p.impair_lr == 1e-4 and p.kl_lr == 1e-5 and p.batch_size == 32 for p in grid["camu"])
    scrub = [(p.lr, p.msteps, p.epochs, p.alpha, p.batch_size) for p in grid["scrub"]]
    assert (5e-4, 2, 3, 0.001, 128) in scrub  # SCRUB's authors, large-scale CIFAR-10
    assert (1e-2, 3, 10, 0.1, 64) in scrub  # the DMM code's


@pytest.mark.slow
def test_cifar10_smoke_config_runs_every_method_on_the_cpu(tmp_path):
    """The CIFAR-10 code path end to end on a small folder in the real format: ResNet-9, every method."""
    from helpers import cli
    from pipeline.data.datasets import write_cifar_folder

    root = write_cifar_folder(tmp_path / "cifar", n_per_batch=60, n_test=50)
    out = cli("run", str(REPO_CONFIGS / "cifar10-smoke.yaml"), "--set", f"data.root={root}",
              "--set", f"store={tmp_path / 'store'}", "--out", str(tmp_path / "report"), timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    report = (tmp_path / "report" / "report.md").read_text()
    from pipeline.unlearn import METHODS

    assert all(name in report for name in METHODS)


# ------------------------------------------------------------------------------------------ method hyperparameters
def method_error(*items: str) -> str:
    from pipeline.stages.unlearn import method_grids

    with pytest.raises(ConfigError) as info:
        method_grids(load_config(TINY, list(items)))
    return str(info.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("unlearn.methods={finetune: {lr: -1}}", "unlearn.methods.finetune.lr: must be > 0, got -1"),
        ("unlearn.methods={finetune: {epochs: 0}}", "unlearn.methods.finetune.epochs: must be >= 1, got 0"),
        ("unlearn.methods={finetune: {momentum: 1}}", "unlearn.methods.finetune.momentum: must be < 1, got 1"),
        ("unlearn.methods={finetune: {schedule: linear}}",
         "unlearn.methods.finetune.schedule: must be 'constant' or 'cosine', got 'linear'"),
        ("unlearn.methods={finetune: {lr: fast}}", "unlearn.methods.finetune.lr: must be a valid number, unable to parse string as a number, got 'fast'"),
        ("unlearn.methods={finetune: {lrr: 0.1}}", "unlearn.methods.finetune.lrr: unknown key (did you mean 'lr'?)"),
        ("unlearn.methods={gradient_ascent: {lr: [0.01, -2]}}", "unlearn.methods.gradient_ascent.lr: must be > 0, got -2"),
        ("unlearn.methods={finetuen: {}}", "unlearn.methods.finetuen: unknown method 'finetuen' (did you mean 'finetune'?)"),
    ],
)
def test_method_hyperparameter_errors_read_like_config_errors(override, expected):
    msg = method_error(override)
    assert msg.startswith(expected)
    assert "pydantic" not in msg and "http" not in msg


def test_every_bad_method_is_named_at_once():
    msg = method_error("unlearn.methods={finetune: {lr: -1, epochs: 0}, scrub: {nope: 1}}")
    assert msg.splitlines()[:2] == ["unlearn.methods.finetune.lr: must be > 0, got -1",
                                    "unlearn.methods.finetune.epochs: must be >= 1, got 0"]
    assert msg.splitlines()[2].startswith("unlearn.methods.scrub.nope: unknown key")


def test_scoring_tasks_ask_for_no_gpu_on_a_gpu_config():
    # report rows, figures and grid scores read and score on the CPU: on a GPU cluster they must not
    # hold a GPU each (training and unlearning tasks still ask for theirs)
    from pipeline.config import ExecutionConfig
    from pipeline.execution import task_options

    ex = ExecutionConfig(device="cuda", num_gpus=1, threads=4)
    assert task_options(ex)["num_gpus"] == 1 and task_options(ex, gpu=False)["num_gpus"] == 0
    assert task_options(ex, gpu=False)["num_cpus"] == 4


# ------------------------------------------------------------------------------------ tuning sets by kind
_REPORTED = [{"name": "r10", "kind": "random", "size": 10}, {"name": "c3", "kind": "class", "class_id": 3, "size": 5},
             {"name": "a5", "kind": "atypical", "size": 5}, {"name": "p1", "kind": "published", "number": 1}]


def test_each_reported_set_maps_to_the_tuning_set_of_its_kind_or_its_named_fallback():
    from pipeline.config import parse_config

    cfg = parse_config({"forget_sets": _REPORTED, "tuning_fallback": {"published": "random"},
                        "tuning_forget_sets": [{"name": "tr", "kind": "random", "size": 8},
                                               {"name": "tc", "kind": "class", "class_id": 5, "size": 5}]})
    assert {f.name: getattr(cfg.tuning_set_for(f.name), "name", None) for f in cfg.forget_sets} == {
        "r10": "tr", "c3": "tc", "a5": None, "p1": "tr"}  # no atypical tuning set and no fallback for it


def test_the_older_single_tuning_set_key_still_loads():
    from pipeline.config import parse_config

    cfg = parse_config({"tuning_forget_set": {"name": "t", "kind": "random", "size": 4}})
    assert [t.name for t in cfg.tuning_forget_sets] == ["t"]
    assert load_config(TINY, ["tuning_forget_set=null"]).tuning_forget_sets == []  # the old way to say none
    assert "give `tuning_forget_sets` only" in error_of({"tuning_forget_set": {"name": "t", "kind": "random", "size": 4},
                                                        "tuning_forget_sets": [{"name": "u", "kind": "random", "size": 4}]})


@pytest.mark.parametrize("extra, expected", [
    ({"tuning_forget_sets": [{"name": "t1", "kind": "random", "size": 4}, {"name": "t2", "kind": "random", "size": 5}]},
     "at most one per kind (decision 31), repeated kind 'random'"),
    ({"tuning_forget_sets": [{"name": "tc", "kind": "class", "class_id": 3, "size": 5}]},
     "'tc' uses class 3, which the reported set 'c3' uses"),
    ({"tuning_fallback": {"published": "randon"}}, "tuning_fallback.published"),
])
def test_bad_tuning_sets_are_config_errors(extra, expected):
    assert expected in error_of({"forget_sets": _REPORTED, **extra})
