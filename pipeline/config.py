"""Typed, frozen configuration loaded from YAML, with `--set a.b=v` overrides and stage identities.

Every field is validated by pydantic before any work starts; errors name the YAML path of the field
(`train.subset.alpha: must be in (0, 1), got 1.5`) and, for a misspelled key, the closest valid name.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SCHEMA_VERSION = 1


class ConfigError(ValueError):
    """Bad user input in a config: the message names the field at fault."""


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------------------- data
class SyntheticSpec(Frozen):
    n_train: int = Field(2000, gt=0)
    n_val: int = Field(500, gt=0)
    shape: tuple[int, int, int] = (3, 32, 32)
    classes: int = Field(10, ge=2)
    seed: int = 0


class DataConfig(Frozen):
    dataset: Literal["digits", "cifar10", "synthetic"] = "digits"
    root: str | None = None  # cifar10: folder holding cifar-10-batches-py/
    val_fraction: float = Field(0.2, gt=0, lt=1)  # digits: stratified split
    split_seed: int = 0
    verify_md5: bool = False  # cifar10: check the published MD5 sums
    synthetic: SyntheticSpec = SyntheticSpec()


# ----------------------------------------------------------------------------------------- model
class ModelConfig(Frozen):
    name: Literal["mlp", "cnn", "resnet9"] = "mlp"
    hidden: int = Field(128, gt=0)  # mlp width / cnn channels
    width: int = Field(64, gt=0)  # resnet9 base width (64 in the papers)


# ----------------------------------------------------------------------------------------- train
class FullFamily(Frozen):
    models: int = Field(16, ge=0)


class SubsetFamily(Frozen):
    models: int = Field(512, ge=0)  # models used for fitting
    heldout: int = Field(64, ge=0)  # separate stream, measures LDS
    alpha: float = 0.5
    store_logits: bool = True

    @field_validator("alpha")
    @classmethod
    def _alpha_in_open_unit(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"must be in (0, 1), got {v}")
        return v


class OracleFamily(Frozen):
    target: int = Field(10, ge=0)  # OM targets and tuning
    reference: int = Field(16, ge=0)  # the `retrain` row of the report (as many as unlearned models)
    eval: int = Field(32, ge=0)  # the only oracles KLoM compares against


class TrainConfig(Frozen):
    epochs: int = Field(20, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: Literal["sgd"] = "sgd"
    lr: float = Field(0.05, gt=0)  # peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(5, ge=0)  # triangular schedule: 0 -> peak at warmup -> 0 at the end
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast applies on GPU only
    augment: bool = False  # random crop (pad 2) + flip, seeded per (stage, model, epoch)
    # decision 38: "inductor" compiles the block's step (forward, loss, backward) with torch.compile in
    # inductor's deterministic mode: the same bits run to run in fresh processes, but not eager's bits, so
    # the choice is part of the recipe's identity (left out of it when "off", so stores made before the
    # field existed keep their ids)
    compile: Literal["off", "inductor"] = "off"
    full: FullFamily = FullFamily()
    subset: SubsetFamily = SubsetFamily()
    oracle: OracleFamily = OracleFamily()

    def recipe(self) -> dict:
        """The fields every family's identity depends on (family sizes excluded, decision 13)."""
        exclude = {"full", "subset", "oracle"} | ({"compile"} if self.compile == "off" else set())
        return self.model_dump(exclude=exclude)


# ----------------------------------------------------------------------------------------- forget sets
class RandomForget(Frozen):
    kind: Literal["random"]
    name: str
    size: int = Field(gt=0)
    seed: int = 0


class ClassForget(Frozen):
    kind: Literal["class"]
    name: str
    class_id: int = Field(ge=0)
    fraction: float = Field(1.0, gt=0, le=1)
    size: int | None = Field(None, gt=0)  # exact count; overrides fraction
    seed: int = 0


class IndicesForget(Frozen):
    kind: Literal["indices"]
    name: str
    indices: list[int] | None = None
    file: str | None = None  # a 1-D integer .npy

    @model_validator(mode="after")
    def _one_source(self) -> "IndicesForget":
        if (self.indices is None) == (self.file is None):
            raise ValueError("give exactly one of `indices` or `file`")
        return self


class PublishedForget(Frozen):
    kind: Literal["published"]
    name: str
    number: int = Field(ge=1, le=10)  # CIFAR-10 forget sets 1-10 of the DMM paper


class AtypicalForget(Frozen):
    """The `size` training points whose `neighbours` nearest training points (pixel space after the
    dataset's per-channel normalisation, the point itself excluded) most often carry another label:
    points a model fits only by memorising them. Chosen from the data alone, with no model."""

    kind: Literal["atypical"]
    name: str
    size: int = Field(gt=0)
    neighbours: int = Field(10, gt=0)  # k of the k-nearest-neighbour vote
    class_id: int | None = Field(None, ge=0)  # only points of this class are candidates


ForgetSpec = Annotated[
    Union[RandomForget, ClassForget, IndicesForget, PublishedForget, AtypicalForget], Field(discriminator="kind")
]
ForgetKind = Literal["random", "class", "indices", "published", "atypical"]


# ----------------------------------------------------------------------------------------- fit
class LassoConfig(Frozen):
    n_lambdas: int = Field(20, ge=2)
    eps: float = Field(1e-2, gt=0, lt=1)
    val_fraction: float = Field(0.1, gt=0, lt=1)
    max_iter: int = Field(500, gt=0)
    tol: float = Field(1e-4, gt=0)  # duality gap relative to ||y - ybar||^2 / m (sklearn)
    # the path's gap, which only chooses lambda (the refit is solved to tol); None: tol. Left out of the
    # fit's identity when None, so that stores fitted before it existed keep theirs
    path_tol: float | None = Field(None, gt=0)
    # after 10 lambdas a target's path stops at this many rises in a row of its validation MSE; None: 1,
    # fast_l1's first rise (left out of the fit's identity when None, as path_tol)
    patience: int | None = Field(None, ge=1)


class FitConfig(Frozen):
    estimator: Literal["diff_in_means", "lasso", "ridge"] = "diff_in_means"
    per_logit: bool = True  # also fit train x targets x classes (dm-direct, DMM)
    ridge_lambda: float = Field(1.0, gt=0)
    lasso: LassoConfig = LassoConfig()
    # models per float batch of the masks in every product of a fit task (decision 35): a task holds one
    # (model_batch, n_train) float buffer, never models x n_train floats. Unset: 4096 (MODEL_BATCH), out of
    # the identity; set, it is part of it (a sum over batches of more than one batch rounds differently)
    model_batch: int | None = Field(None, gt=0)
    # keep theta_logit (column-major, 60 GB float16 at CIFAR-10 size) once the fit is complete; false keeps
    # only its row-major copy theta_logit_rows (same bytes), dropping theta_logit after the copy (storage_layout.md)
    store_theta_logit: bool = True
    # the name of an attribution brought in with `oracle-farm import-attribution`: dm-direct and DMM read it
    # instead of this fit (their unlearn stages then name its id); not part of the fit stage's identity
    attribution: str | None = None

    def section(self) -> dict:
        """The fit stage's recorded config section and identity: unset optional fields left out,
        store_theta_logit only when false (a fit that dropped theta_logit cannot serve one that keeps it;
        the default leaves every earlier fit's identity as it was), and never the attribution the datamodel
        methods read (it is not this fit's)."""
        section = self.model_dump(mode="json", exclude_none=True, exclude={"attribution"})
        if section["store_theta_logit"]:
            del section["store_theta_logit"]
        return section


# ----------------------------------------------------------------------------------------- unlearn
class UnlearnConfig(Frozen):
    # method name -> hyperparameters (a list gives a grid selected on the tuning forget set); a list of
    # such mappings is the union of their grids
    methods: dict[str, dict[str, Any] | list[dict[str, Any]]] = Field(default_factory=lambda: {"do_nothing": {}})
    models: int | None = Field(None, ge=1)  # full models to unlearn; default all (train.full.models)
    seed: int = 0
    # decision 32: every grid point also runs on every reported set, and the best by the selection rule
    # against that set's own eval oracles is recorded apart (optimistic: never the headline)
    upper_bound: bool = False


# ----------------------------------------------------------------------------------------- evaluate
class EvaluateConfig(Frozen):
    bins: int = Field(20, ge=2)
    clip: float = Field(100.0, gt=0)
    floor: float = Field(1e-5, gt=0)
    compat: bool = False  # reproduce EasyDUB's binning exactly
    bootstrap: int = Field(200, ge=0)


# ----------------------------------------------------------------------------------------- execution
class ExecutionConfig(Frozen):
    """How to run, never what to compute: none of this enters a stage identity."""

    num_cpus: int = Field(2, gt=0)
    num_gpus: float = Field(0, ge=0)  # per task
    device: Literal["cpu", "cuda"] = "cpu"
    block_size: int = Field(32, gt=0)  # models per Ray task, and per chunk of a new family (storage_layout.md)
    # training data (decision 12): resident on the device, streamed through FFCV's Loader, or auto
    # (resident when the dataset takes at most half the device's free memory); same batches either way
    data_path: Literal["auto", "resident", "stream"] = "auto"
    # how a block of models is computed (decision 28): one grouped computation, each member's dense
    # layers in turn, the same on one CUDA stream per member, or what the device's calibration picked
    stacking: Literal["auto", "grouped", "loop", "streams"] = "auto"
    # on a GPU, replay each training step in which every member of a block trains as one captured CUDA
    # graph (the same kernels, one launch; ignored on a CPU and under streams)
    cuda_graphs: bool = True
    fit_block_targets: int = Field(512, gt=0)  # targets per fit task
    # GiB a fit task may use on its device; unset: the device's memory (CUDA: the GPU's, times num_gpus;
    # CPU: the machine's, shared by the num_cpus // threads tasks at once). The fit refuses (exit 2),
    # before any task, a config whose predicted peak exceeds it (pipeline.datamodels.memory)
    fit_memory_gb: float | None = Field(None, gt=0)
    threads: int = Field(1, gt=0)  # torch threads per task (pinned, recorded)
    max_retries: int = Field(2, ge=0)
    ray_address: str | None = None
    lease_ttl: float = Field(30.0, gt=0)  # seconds without a heartbeat before a stage's lease is stale
    lease_wait: float = Field(0.0, ge=0)  # seconds to wait for a stage another driver holds (0: exit 2)


class Config(Frozen):
    name: str = "digits"
    store: str = "./store"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    forget_sets: list[ForgetSpec] = Field(default_factory=list)
    # decision 31: at most one per kind; a reported set is tuned on the one of its own kind. Random, class
    # and atypical tuning sets are drawn outside every reported set (pipeline.data.forget_sets)
    tuning_forget_sets: list[ForgetSpec] = Field(default_factory=list)
    # reported kind -> the kind of tuning set its grids are selected on where no tuning set has its own
    # kind (e.g. {published: random}); without an entry such a set with a grid to select is an error
    tuning_fallback: dict[ForgetKind, ForgetKind] = Field(default_factory=dict)
    fit: FitConfig = FitConfig()
    unlearn: UnlearnConfig = UnlearnConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    execution: ExecutionConfig = ExecutionConfig()

    @field_validator("store")
    @classmethod
    def _store_is_only_a_location(cls, value: str) -> str:
        """A local path or a URL such as s3://bucket/prefix, and nothing else: credentials and endpoint
        come from the environment (AWS_*), never from the config, which is printed and logged. The
        message never repeats the value (it may hold a secret)."""
        if "://" in value:
            netloc = value.split("://", 1)[1].split("/", 1)[0]
            if "@" in netloc or "?" in value or "#" in value:
                raise ValueError("must be only a location (a local path or s3://bucket/prefix), got a URL with "
                                 "credentials or parameters: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                                 "AWS_PROFILE and AWS_ENDPOINT_URL in the environment instead")
        return value

    @model_validator(mode="before")
    @classmethod
    def _old_tuning_key(cls, raw: Any) -> Any:
        """Configs written before decision 31 name one `tuning_forget_set`: it is the one tuning set, and
        null (as `--set tuning_forget_set=null` always meant) is none."""
        if not isinstance(raw, dict) or "tuning_forget_set" not in raw:
            return raw
        raw = dict(raw)
        old = raw.pop("tuning_forget_set")
        if old is not None and raw.get("tuning_forget_sets"):
            raise ValueError("give `tuning_forget_sets` only (`tuning_forget_set` is its older, one-set form)")
        raw["tuning_forget_sets"] = [] if old is None else [old]
        return raw

    @model_validator(mode="after")
    def _unique_forget_names(self) -> "Config":
        names = [f.name for f in self.all_forget_sets()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"forget set names must be unique, repeated: {dupes}")
        return self

    @model_validator(mode="after")
    def _tuning_sets_by_kind(self) -> "Config":
        kinds = [t.kind for t in self.tuning_forget_sets]
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"tuning_forget_sets: at most one per kind (decision 31), repeated kind {repeated[0]!r}")
        used = {f.class_id: f.name for f in self.forget_sets if f.kind == "class"}
        for t in self.tuning_forget_sets:
            if t.kind == "class" and t.class_id in used:
                raise ValueError(f"tuning_forget_sets: {t.name!r} uses class {t.class_id}, which the reported set "
                                 f"{used[t.class_id]!r} uses: a class tuning set needs a class no reported set uses")
        return self  # a fallback to a kind no tuning set has is named where a grid needs it (Plan.tuning_set)

    def all_forget_sets(self) -> list:
        return list(self.forget_sets) + list(self.tuning_forget_sets)

    def tuning_set_for(self, name: str):
        """The tuning set a reported set's grids are selected on: the one of its kind, else the one of the
        kind `tuning_fallback` names for it, else None."""
        kind = self.forget_set(name).kind
        by_kind = {t.kind: t for t in self.tuning_forget_sets}
        return by_kind.get(kind) or by_kind.get(self.tuning_fallback.get(kind))

    def forget_set(self, name: str):
        for spec in self.all_forget_sets():
            if spec.name == name:
                return spec
        known = [f.name for f in self.all_forget_sets()]
        raise ConfigError(f"unknown forget set {name!r}; known: {known}{_suggest(name, known)}")


# ----------------------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, source=str(path))


def parse_config(raw: dict, source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source)) from None


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value parsed as YAML (so 3 is an int, [1,2] a list, null None)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None


def format_errors(exc: ValidationError, source: str) -> str:
    return "\n".join([f"{source}: invalid config", *(f"  {line}" for line in error_lines(exc))])


def error_lines(exc: ValidationError, root: type = None, prefix: str = "") -> list[str]:
    """One line per error, `<yaml path>: <what is wrong>, got <value>`, in the words of this module's
    own validators (`must be > 0`), never pydantic's help URL. `root`: the model validated (default
    Config); `prefix`: the YAML path of that model, e.g. `unlearn.methods.finetune`."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        field = _join_path(prefix, _yaml_path(loc, root))
        if err["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key{_suggest(loc[-1], _valid_keys(loc[:-1], root))}")
        else:
            msg = _message(err)
            got = err.get("input")
            shown = "" if isinstance(got, (dict, list)) or "got" in msg else f", got {got!r}"
            lines.append(f"{field}: {msg}{shown}")
    return lines


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _message(err: dict) -> str:
    """pydantic's message, said as a config error: `must be > 0` for a bound, `must be ...` for a type."""
    if err["type"] in _BOUNDS:
        key, op = _BOUNDS[err["type"]]
        bound = err.get("ctx", {}).get(key)
        return f"must be {op} {int(bound) if isinstance(bound, float) and bound.is_integer() else bound}"
    msg = err["msg"].removeprefix("Value error, ")
    return "must be " + msg.removeprefix("Input should be ") if msg.startswith("Input should be ") else msg


def _join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    return prefix if path == "<root>" else (f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}")


_FORGET_KINDS = {"random": RandomForget, "class": ClassForget, "indices": IndicesForget,
                 "published": PublishedForget, "atypical": AtypicalForget}


def _mentions(annotation: Any, cls: type) -> bool:
    """Whether a type annotation is or contains cls (in a list, an Optional, an Annotated union...)."""
    return annotation is cls or any(_mentions(arg, cls) for arg in get_args(annotation))


def _walk(loc: list[str], root: type = None) -> tuple[list[str], Any]:
    """Follow a pydantic error location through the config models: the YAML path parts (the
    discriminator tag pydantic inserts after a forget-set union dropped, and only that one: `indices`
    is both a tag and a field name) and the model reached at the end (None past a plain field)."""
    parts: list[str] = []
    model: Any = root or Config
    tag_next = False
    for part in loc:
        if tag_next and part in _FORGET_KINDS:
            model, tag_next = _FORGET_KINDS[part], False
            continue
        parts.append(part)
        if part.isdigit() or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(part)
        annotation = field.annotation if field is not None else None
        if annotation is not None and _mentions(annotation, RandomForget):
            model, tag_next = None, True
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            model = None
    return parts, model


def _yaml_path(loc: list[str], root: type = None) -> str:
    out = ""
    for p in _walk(loc, root)[0]:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "<root>"


def _valid_keys(loc: list[str], root: type = None) -> list[str]:
    return list(getattr(_walk(loc, root)[1], "model_fields", {}))


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else (f"; valid: {', '.join(valid)}" if valid else "")


# ----------------------------------------------------------------------------------------- identity
def stage_id(kind: str, section: Any, upstream: dict[str, str] | None = None) -> str:
    """Identity = sha256 over the stage's config section (defaults included), its upstream stage ids
    and the schema version (decision 15). Returned as 16 hex characters."""
    if isinstance(section, BaseModel):
        section = section.model_dump(mode="json")
    payload = {"schema": SCHEMA_VERSION, "kind": kind, "config": section, "upstream": upstream or {}}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
