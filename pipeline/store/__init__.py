"""The store: one root (a local path or an `s3://bucket/prefix` URL) holding stages side by side,
content-addressed by their identities. The only module that knows paths and Zarr.

Layout (see storage_layout.md):
    <root>/<kind>/<kind>-<id>/stage.json        kind, id, config section, upstream ids, schema
    <root>/<kind>/<kind>-<id>/arrays.zarr/      Zarr v3 group: one subgroup per role
    <root>/<kind>/<kind>-<id>/markers/<role>/<start>-<end>.json   one per finished block
    <root>/<kind>/<kind>-<id>/COMPLETE.json     stages with a fixed output (prepare, fit)

Completion never relies on rename: data first, then a small marker object; a marker that is
missing or unreadable means "not done".
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fsspec

from pipeline.config import SCHEMA_VERSION

if TYPE_CHECKING:  # numpy is imported where used: a finished run's re-run answers without it
    import numpy as np


class StoreError(RuntimeError):
    """The store is unreachable, or holds something other than what this config expects."""


class CorruptFile(StoreError):
    """A stored file or block differs from what the stage that wrote it recorded (size, sha256): the
    message names it and how to have it written again. Bad input (exit 2), like every StoreError."""


class NoSpace(RuntimeError):
    """A local disk is full (a local store, the worker cache $ORACLE_FARM_CACHE): the message names the
    path, the bytes the write needed and what is free. A failure, not bad input (exit 1): nothing half-written
    is taken as done (a block's marker comes after its rows), and a re-run after freeing space redoes the rest."""


def _is_no_space(exc: BaseException) -> bool:
    import errno

    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def no_space(path: str | Path, needed: int) -> NoSpace:
    """The NoSpace error of a write of `needed` bytes to `path` (free space read from its nearest existing folder)."""
    import shutil

    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return NoSpace(f"{path}: no space left on the device ({needed:,} bytes needed for this write, {free:,} bytes "
                   "free there); free space there and re-run the same command (every block with a marker is kept)")


def _is_url(root: str) -> bool:
    return "://" in root


def _s3_endpoint() -> str | None:
    """The S3 endpoint named by the environment (as botocore reads it), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


# The S3 client's retries and timeouts: the one place they are set, for every Store (the driver's and each
# task's) and for Zarr's chunk I/O, which gets the same storage options. botocore's standard mode retries
# throttling (503 SlowDown), 5xx answers, reset connections and timeouts, up to S3_MAX_ATTEMPTS attempts
# with exponential backoff (at most 20 s apart); s3fs runs each call in its own loop of up to
# `S3FileSystem.retries` (5) tries for what it knows to be transient (timeouts, SlowDown, truncated
# bodies). A store that stays down fails a call after at most 5 x S3_MAX_ATTEMPTS attempts. Every write
# retried this way is idempotent: an object is written whole by one PUT (markers, JSON, chunks), so a
# PUT applied but answered with an error and sent again leaves the same object. The two variables
# shorten both for tests (a fault-injecting proxy) or a store known to be close.
S3_MAX_ATTEMPTS = 10
S3_CONNECT_TIMEOUT = 10.0  # seconds
S3_READ_TIMEOUT = 60.0  # seconds
S3_ATTEMPTS_ENV, S3_TIMEOUT_ENV = "ORACLE_FARM_S3_ATTEMPTS", "ORACLE_FARM_S3_TIMEOUT"


def s3_client_config() -> dict:
    """botocore `Config` arguments of every S3 client (see above)."""
    attempts = int(os.environ.get(S3_ATTEMPTS_ENV) or S3_MAX_ATTEMPTS)
    timeout = float(os.environ.get(S3_TIMEOUT_ENV) or 0)
    return {"retries": {"max_attempts": attempts, "mode": "standard"},
            "connect_timeout": min(timeout, S3_CONNECT_TIMEOUT) if timeout else S3_CONNECT_TIMEOUT,
            "read_timeout": timeout or S3_READ_TIMEOUT}


class StoreUnavailable(RuntimeError):
    """An object store failed a call after all the client's retries (s3_client_config): a failure, not
    bad input (exit 1). Every block with a marker is done; a re-run redoes the rest."""


def store_unavailable(store: "Store", exc: BaseException) -> StoreUnavailable | None:
    """`exc` as a StoreUnavailable naming the store, when it is an object store's failure to answer (an
    OSError from s3fs, a botocore error, as raised here or in a Ray task); None for anything else (a
    missing or refused object, a full local disk, an error of the code's own)."""
    if store.is_local:
        return None
    from botocore.exceptions import BotoCoreError, ClientError

    cause = getattr(exc, "cause", None) or exc  # a task's error, as Ray re-raises it
    if isinstance(cause, (FileNotFoundError, PermissionError)) or _is_no_space(cause):
        return None
    if not isinstance(cause, (OSError, BotoCoreError, ClientError)):
        return None
    where = store.root + (f" (endpoint {_s3_endpoint()})" if _s3_endpoint() else "")
    said = " ".join(str(cause).split())[:300]
    return StoreUnavailable(f"{where}: the object store is unavailable ({type(cause).__name__}: {said}) after "
                            f"{s3_client_config()['retries']['max_attempts']} attempts per call; every block with a "
                            "marker is done: re-run the same command once the store answers")


def default_storage_options(root: str) -> dict:
    """fsspec options for a store URL. Credentials are never among them: s3fs/botocore read
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE from the environment.
    The endpoint is passed explicitly (the same value botocore would read) so that fsspec's cached
    filesystem instances are told apart by endpoint; listings are never cached, since other processes
    add markers while this one runs."""
    if not root.startswith(("s3://", "s3a://")):
        return {}
    options: dict = {"use_listings_cache": False, "config_kwargs": s3_client_config()}
    endpoint = _s3_endpoint()
    if endpoint:
        options["endpoint_url"] = endpoint
    return options


class Store:
    def __init__(self, root: str, storage_options: dict | None = None):
        self.is_local = not _is_url(root)
        self.root = root.rstrip("/") if self.is_local or not root.endswith("://") else root
        if self.is_local:
            self.root = str(Path(self.root).expanduser().resolve())
            self.fs = fsspec.filesystem("file")
            self.base = self.root
            self.storage_options = {}
        else:
            self.storage_options = {**default_storage_options(self.root), **(storage_options or {})}
            try:
                self.fs, self.base = fsspec.url_to_fs(self.root, **self.storage_options)
            except Exception as exc:  # unknown protocol, missing driver, malformed URL
                raise StoreError(f"{self.root}: not a usable store URL ({type(exc).__name__}: {exc}); "
                                 "expected a local path or s3://bucket/prefix") from None
            self.base = self.base.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    # ------------------------------------------------------------------ objects
    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def url(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.is_local:  # a local reader must never see half an object
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=Path(target).parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, target)
            except OSError as exc:  # never leave the temporary file behind (on a full disk, least of all)
                Path(tmp).unlink(missing_ok=True)
                if _is_no_space(exc):
                    raise no_space(target, len(data)) from None
                raise
        else:  # an object PUT is atomic on S3
            self.fs.pipe_file(target, data)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel), **self._one_get)

    @property
    def _one_get(self) -> dict:
        """s3fs reads a whole object with a HEAD (its size, to split large ones into parallel ranges)
        before the GET; one GET is what a marker, a part or a block's object needs."""
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        return {"max_concurrency": 1} if "s3" in protocols else {}

    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=_json_default).encode())

    def read_json(self, rel: str):
        """The object, or None when it is missing or unreadable (a half-written marker is not done)."""
        try:
            return _parse_json(self.read_bytes(rel))
        except FileNotFoundError:
            return None

    def read_many(self, rels: list[str]) -> list[bytes | None]:
        """The objects' bytes in rels' order (None where one is missing), fetched concurrently: on an
        object store in one batched `cat_ranges` (fsspec runs the GETs in parallel, bounded by its batch size),
        locally by a bounded thread pool. One round of latency for a whole listing of markers."""
        if len(rels) <= 2:
            return [self._read_or_none(rel) for rel in rels]
        if self.is_local:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(READ_WORKERS, len(rels))) as pool:
                return list(pool.map(self._read_or_none, rels))
        # cat_ranges, not cat: cat expands (checks) each path first, doubling the requests
        got = self.fs.cat_ranges([self.path(rel) for rel in rels], None, None, on_error="return", **self._one_get)
        for value in got:
            if isinstance(value, Exception) and not isinstance(value, FileNotFoundError):
                raise value
        return [value if isinstance(value, bytes) else None for value in got]

    def _read_or_none(self, rel: str) -> bytes | None:
        try:
            return self.read_bytes(rel)
        except FileNotFoundError:
            return None

    def read_jsons(self, rels: list[str]) -> list:
        """`read_json` of each, read concurrently (`read_many`): None where missing or unreadable."""
        return [_parse_json(data) for data in self.read_many(rels)]

    def list(self, rel: str) -> list[str]:
        try:
            return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    def find(self, rel: str) -> list[str]:
        """Every object under rel, as paths relative to it, sorted (empty when there is none)."""
        base = self.path(rel).rstrip("/")
        try:
            return sorted(p[len(base) + 1 :] for p in self.fs.find(base) if p.startswith(base + "/"))
        except FileNotFoundError:
            return []

    def put_file(self, local: str | Path, rel: str) -> None:
        if self.is_local:
            Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path(rel) + ".partial"
            try:
                self.fs.put_file(str(local), tmp)
                os.replace(tmp, self.path(rel))
            except OSError as exc:
                Path(tmp).unlink(missing_ok=True)
                if _is_no_space(exc):
                    raise no_space(self.path(rel), Path(local).stat().st_size) from None
                raise
        else:  # one PUT, or a multipart upload that appears only when completed: no rename on S3
            self.fs.put_file(str(local), self.path(rel))

    def local_file(self, rel: str, cache_dir: str | None = None, sha256: str | None = None) -> Path:
        """A local path to an object: itself when local, else a verified copy in a local cache.

        The copy is made once per machine (cache: `cache_dir`, else $ORACLE_FARM_CACHE, else
        ~/.cache/oracle-farm), into a temporary name, checked against the object's size and, when
        given, the sha256 recorded by the stage that wrote it, and only then renamed into place (a
        rename inside the local cache only). A cached copy is reused only when its size and hash
        still match; a corrupt one is copied again."""
        if self.is_local:
            return Path(self.path(rel))
        try:
            size = int(self.fs.info(self.path(rel))["size"])
        except FileNotFoundError:
            raise StoreError(f"{self.url(rel)}: not found in the store") from None
        cache = Path(cache_dir or os.environ.get("ORACLE_FARM_CACHE") or Path.home() / ".cache/oracle-farm")
        key = hashlib.sha256(f"{self.url(rel)}\0{sha256 or ''}".encode()).hexdigest()[:24]
        target = cache / key / Path(rel).name
        if target.is_file() and target.stat().st_size == size and (sha256 is None or file_sha256(target) == sha256):
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise no_space(target, size) if _is_no_space(exc) else exc from None
        tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
        try:
            try:
                self.fs.get_file(self.path(rel), str(tmp))
            except OSError as exc:
                if _is_no_space(exc):
                    raise no_space(target, size) from None
                raise
            got = tmp.stat().st_size
            if got != size:
                raise StoreError(f"{self.url(rel)}: copied {got} bytes, expected {size}")
            if sha256 is not None and (digest := file_sha256(tmp)) != sha256:
                raise StoreError(f"{self.url(rel)}: the copy's sha256 {digest[:16]}... differs from the "
                                 f"recorded {sha256[:16]}...: the stored object is corrupt or was replaced")
            os.replace(tmp, target)  # a rename inside the local cache only
        finally:
            tmp.unlink(missing_ok=True)
        return target

    def size(self, rel: str) -> int:
        try:
            return int(self.fs.du(self.path(rel)))
        except FileNotFoundError:
            return 0

    def remove(self, rel: str) -> None:
        if self.exists(rel):
            self.fs.rm(self.path(rel), recursive=True)

    # ------------------------------------------------------------------ zarr
    def zarr_store(self, rel: str):
        import zarr  # imported here: a no-op `run` reads only markers and must start fast

        if self.is_local:
            return zarr.storage.LocalStore(self.path(rel))
        return zarr.storage.FsspecStore.from_url(self.url(rel), storage_options=self.storage_options)

    def open_group(self, rel: str, mode: str = "a") -> zarr.Group:
        import zarr

        return zarr.open_group(store=self.zarr_store(rel), mode=mode, zarr_format=3)

    @staticmethod
    def create_array(group: zarr.Group, name: str, *, stage: StageRef, shape: tuple, chunks: tuple, dtype: str,
                     shards: tuple | None = None, fill_value=0, overwrite: bool = False) -> zarr.Array:
        """Every stored array is created here: with its `dimension_names` and attributes (what it is, its
        units, the stage and config section that made it; `ARRAY_DOCS`), so that xarray, or any Zarr v3
        reader, can name its axes."""
        dims, description, units = array_doc(group.basename, name)
        if len(dims) != len(shape):
            raise StoreError(f"{name}: {len(shape)} axes, but ARRAY_DOCS names {len(dims)}: {dims}")
        section = STAGE_SECTIONS[stage.kind] + (f".{group.basename}" if stage.kind == "oracle" else "")
        attributes = {"description": description, "units": units, "stage": stage.rel, "stage_id": stage.id,
                      "config_section": section}
        return group.create_array(name, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill_value,
                                  overwrite=overwrite, dimension_names=dims, attributes=attributes)

    def check_reachable(self, create: bool = True) -> None:
        """Fail early, with a message naming the store, when it cannot be used: a local root that
        cannot be created (create=True) or an object store whose URL has no bucket, whose bucket does
        not exist, which refuses the credentials or which cannot be reached. Never prints secrets."""
        if self.is_local:
            try:
                if create:
                    Path(self.base).mkdir(parents=True, exist_ok=True)
                elif Path(self.base).exists() and not Path(self.base).is_dir():
                    raise StoreError(f"{self.root}: the store root is not a folder")
            except OSError as exc:
                raise StoreError(f"{self.root}: store not usable ({type(exc).__name__}: {exc})") from None
            return
        protocols = (self.fs.protocol,) if isinstance(self.fs.protocol, str) else tuple(self.fs.protocol)
        if "s3" in protocols:
            self._check_s3()
            return
        try:
            self.fs.ls(self.base, detail=False)
        except FileNotFoundError:
            pass  # a fresh prefix
        except Exception as exc:
            raise StoreError(f"{self.root}: store not reachable ({type(exc).__name__}: {exc})") from None

    def _check_s3(self) -> None:
        bucket, _, prefix = self.base.partition("/")
        where = self.root + (f" (endpoint {_s3_endpoint()})" if _s3_endpoint() else "")
        if not bucket:
            raise StoreError(f"{self.root}: no bucket in the store URL; expected s3://bucket/prefix")
        # a probe client that gives up after two attempts, so a wrong endpoint fails in seconds
        probe = fsspec.filesystem("s3", skip_instance_cache=True, **{
            **self.storage_options, "config_kwargs": {"connect_timeout": 10, "read_timeout": 30,
                                                      "retries": {"max_attempts": 2, "mode": "standard"}}})
        probe.retries = 1
        try:
            try:
                self._probe_s3(probe, bucket, prefix)
            except Exception as exc:
                if _cannot_connect(exc) or isinstance(exc, (FileNotFoundError, PermissionError)):
                    raise
                # it answered, but badly (503 SlowDown, a 5xx, a reset, a timeout): a flaky store, not a wrong
                # one; the stages' own client, with all its retries (s3_client_config), has the last word
                self._probe_s3(self.fs, bucket, prefix)
        except FileNotFoundError:
            raise StoreError(f"{where}: bucket {bucket!r} does not exist") from None
        except PermissionError as exc:
            raise StoreError(f"{where}: access denied ({exc}); check the credentials in AWS_ACCESS_KEY_ID / "
                             "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy") from None
        except Exception as exc:
            raise StoreError(f"{where}: store not reachable ({type(exc).__name__}: {exc}); check "
                             "AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 and the network") from None

    @staticmethod
    def _probe_s3(fs, bucket: str, prefix: str) -> None:
        fs.call_s3("head_bucket", Bucket=bucket)
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=f"{prefix}/" if prefix else "", MaxKeys=1)


def _cannot_connect(exc: Exception) -> bool:
    """Whether an S3 call failed because nothing answered at the endpoint (refused, no such host)."""
    from botocore.exceptions import EndpointConnectionError

    return isinstance(exc, EndpointConnectionError)


READ_WORKERS = 32  # concurrent reads of one `read_many` on local disk


def _parse_json(data: bytes | None):
    try:
        return None if data is None else json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _json_default(obj):
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ---------------------------------------------------------------------------------------- stages
@dataclass(frozen=True)
class StageRef:
    kind: str
    id: str

    @property
    def rel(self) -> str:
        return f"{self.kind}/{self.kind}-{self.id}"


def check_stage(store: Store, ref: StageRef, section: dict, upstream: dict) -> bool:
    """Read-only: True when the stored stage record describes this stage, False when there is none;
    StoreError when it describes another. Check every stage a command will write before writing any."""
    stored = store.read_json(f"{ref.rel}/stage.json")
    if stored is None:
        return False
    record = {"kind": ref.kind, "id": ref.id, "config": section, "upstream": upstream, "schema": SCHEMA_VERSION}
    for key, value in record.items():
        if json.dumps(stored.get(key), sort_keys=True) != json.dumps(value, sort_keys=True, default=_json_default):
            raise StoreError(
                f"{store.url(ref.rel)}: the stored stage was made by another config ({key} differs); "
                "use another store root or remove that stage"
            )
    return True


def ensure_stage(store: Store, ref: StageRef, section: dict, upstream: dict, label: str = "") -> None:
    """Create the stage record, or check that the stored one describes the same stage."""
    if not check_stage(store, ref, section, upstream):
        record = {"kind": ref.kind, "id": ref.id, "config": section, "upstream": upstream,
                  "schema": SCHEMA_VERSION, "label": label, "created": time.time()}
        store.write_json(f"{ref.rel}/stage.json", record)


def is_complete(store: Store, ref: StageRef) -> bool:
    return store.read_json(f"{ref.rel}/COMPLETE.json") is not None


def mark_complete(store: Store, ref: StageRef, info: dict) -> None:
    store.write_json(f"{ref.rel}/COMPLETE.json", {**info, "finished": time.time()})


# ---------------------------------------------------------------------------------------- array docs
# name (or group/name) -> (dimension names, description, units): what `Store.create_array` records with
# each array. Axes: model (a row of a family), point (train then val, P = n_train + n_val), class,
# split (train, val), train_point (n_train), val_point (n_val), target (a fit target: a point, P).
ARRAY_DOCS = {
    "margins": (("model", "point"), "margin of each model on each point (train then val): z_y - logsumexp_{j != y} "
                "z_j of its logits z and the point's label y (storage_layout.md)", "nats"),
    "logits": (("model", "point", "class"), "logits of each model on each point (train then val)", "nats"),
    "accuracy": (("model", "split"), "top-1 accuracy of each model on train, val", "fraction"),
    "masks": (("model", "train_point"), "whether the training point was in the model's training subset", "bool"),
    "theta": (("train_point", "target"), "per-margin datamodels: weight of training point i in the linear model "
              "of target t's margin, t a column", "nats per inclusion"),
    "theta_rows": (("train_point", "target"), "theta, chunked for row reads (one training point's effect "
                   "on every target)", "nats per inclusion"),
    "bias": (("target",), "intercept of each target's per-margin datamodel", "nats"),
    "lds": (("target",), "linear datamodeling score of each target: Spearman correlation of predicted and "
            "true margins over the held-out subset models", "1"),
    "lam": (("target",), "regularization of each target's fit (LASSO lambda chosen on the path)", "1"),
    "theta_logit_rows": (("train_point", "target", "class"), "theta_logit, sharded for row reads (one training "
                         "point's per-logit effect on every target)", "nats per inclusion"),
    "theta_logit": (("train_point", "target", "class"), "per-logit datamodels: weight of training point i in "
                    "the linear model of target t's logit of class c", "nats per inclusion"),
    "bias_logit": (("target", "class"), "intercept of each target's per-logit datamodels", "nats"),
    "lds_logit": (("target", "class"), "linear datamodeling score of each target's per-logit datamodel of "
                  "class c: Spearman correlation of predicted and true logits over the held-out subset models", "1"),
    "labels/train": (("train_point",), "label of each training point", "class index"),
    "labels/val": (("val_point",), "label of each validation point", "class index"),
}
# stage kind -> the config section that makes it (an oracle family adds its role: train.oracle.eval)
STAGE_SECTIONS = {"prepare": "data", "full": "train.full", "subset": "train.subset", "oracle": "train.oracle",
                  "fit": "fit", "unlearn": "unlearn", "external": "import-margins"}


def array_doc(group_name: str, name: str) -> tuple[tuple[str, ...], str, str]:
    doc = ARRAY_DOCS.get(f"{group_name}/{name}") or ARRAY_DOCS.get(name)
    if doc is None:
        raise StoreError(f"{group_name}/{name}: no entry in pipeline.store.ARRAY_DOCS (its axes and meaning)")
    return doc


# ---------------------------------------------------------------------------------------- families
@dataclass(frozen=True)
class ArraySpec:
    """An array with a leading model axis, chunked by `model_chunk` models (the family's, chosen when its
    arrays are created): blocks of models are whole numbers of chunks (`pending_blocks`).

    point_chunk: the chunk along the next axis (points), for arrays read by column bands (the
    subset family's outputs, read by fit tasks one target block at a time); None: whole rows."""

    name: str
    tail: tuple[int, ...]
    dtype: str
    point_chunk: int | None = None

    def chunks(self, model_chunk: int = 1) -> tuple[int, ...]:
        if self.point_chunk is None:
            return (model_chunk, *self.tail)
        return (model_chunk, min(self.point_chunk, self.tail[0]), *self.tail[1:])


class Family:
    """Rows of models of one role in one stage: arrays with a model axis that grows (decision 13)."""

    def __init__(self, store: Store, ref: StageRef, role: str, specs: list[ArraySpec]):
        self.store, self.ref, self.role, self.specs = store, ref, role, specs
        self.group_rel = f"{ref.rel}/arrays.zarr"
        self.marker_rel = f"{ref.rel}/markers/{role}"

    def ensure_arrays(self, n_models: int, model_chunk: int = 1) -> int:
        """Create the arrays (model_chunk models per chunk), or grow their model axis to
        n_models (never shrinks). Returns the family's model chunk: an existing family keeps its own.
        Per-model chunks cost Zarr about a millisecond each to write or read (digits: 0.2 s to write 100
        models' outputs at chunk 1, 0.03 s at 64), so a family's chunk is a block of models."""
        root = self.store.open_group(self.group_rel)
        group = root.require_group(self.role)
        for spec in self.specs:
            if spec.name in group:
                arr = group[spec.name]
                if arr.shape[1:] != spec.tail:
                    raise StoreError(f"{self.store.url(self.group_rel)}/{self.role}/{spec.name}: shape {arr.shape} "
                                     f"does not match the expected (*, {spec.tail})")
                if arr.shape[0] < n_models:
                    arr.resize((n_models, *spec.tail))
            else:
                self.store.create_array(group, spec.name, stage=self.ref, shape=(n_models, *spec.tail),
                                        chunks=spec.chunks(model_chunk), dtype=spec.dtype)
        return self.model_chunk()

    def model_chunk(self) -> int:
        """Models per chunk of this family's arrays (1 in stores written before blocks were chunks)."""
        return self.array(self.specs[0].name).chunks[0]

    def array(self, name: str, mode: str = "r") -> zarr.Array:
        return self.store.open_group(self.group_rel, mode=mode)[f"{self.role}/{name}"]

    def write_block(self, start: int, arrays: dict[str, np.ndarray], info: dict | None = None) -> None:
        """Write rows start..start+n of every array, then the marker (sizes and checksums)."""
        import numpy as np

        group = self.store.open_group(self.group_rel, mode="r+")[self.role]
        n = None
        checksums = {}
        for spec in self.specs:
            data = np.ascontiguousarray(arrays[spec.name], dtype=spec.dtype)
            n = data.shape[0] if n is None else n
            try:
                group[spec.name][start : start + n] = data
            except OSError as exc:
                if _is_no_space(exc) and self.store.is_local:  # at most the rows' bytes (chunks are compressed)
                    raise no_space(self.store.path(f"{self.group_rel}/{self.role}/{spec.name}"),
                                   sum(np.asarray(a).nbytes for a in arrays.values())) from None
                raise
            checksums[spec.name] = hashlib.sha256(data.tobytes()).hexdigest()
        marker = {"start": start, "end": start + n, "checksums": checksums, "info": info or {}}
        self.store.write_json(f"{self.marker_rel}/{start:07d}-{start + n:07d}.json", marker)

    def markers(self) -> list[dict]:
        """Every readable marker, in name order: one listing, then the markers read concurrently."""
        names = [name for name in self.store.list(self.marker_rel) if name.endswith(".json")]
        return [m for m in self.store.read_jsons([f"{self.marker_rel}/{name}" for name in names]) if m is not None]

    def model_infos(self, n_models: int) -> list[dict]:
        """The `info` of each model 0..n_models that has a marker, once per model (a marker of rows a..b
        counts b - a times), so that means over it are means over models."""
        return [m["info"] for m in self.markers() for _ in range(m["start"], min(m["end"], n_models))]

    def listed_done(self, n_models: int) -> int:
        """Models 0..n_models whose block has a marker, from the markers' names alone (start-end.json):
        one listing instead of reading every marker, for `status`. A marker being written counts here
        already; the stages decide from `done_mask`, which reads them."""
        import numpy as np

        done = np.zeros(n_models, dtype=bool)
        for name in self.store.list(self.marker_rel):
            start, _, end = name.removesuffix(".json").partition("-")
            if name.endswith(".json") and start.isdigit() and end.isdigit():
                done[int(start) : min(int(end), n_models)] = True
        return int(done.sum())

    def done_mask(self, n_models: int) -> np.ndarray:
        import numpy as np

        done = np.zeros(n_models, dtype=bool)
        for m in self.markers():
            done[m["start"] : min(m["end"], n_models)] = True
        return done

    def read(self, name: str, n_models: int | None = None, verify: bool = True) -> np.ndarray:
        """Rows 0..n_models of an array, each finished block checked against its marker's sha256
        (CorruptFile naming the rows, the marker and the fix when one differs or a chunk cannot be
        decoded). Rows of a block that reaches past n_models are read to check it whole."""
        import numpy as np

        arr = self.array(name)
        n = n_models if n_models is not None else arr.shape[0]
        markers = [m for m in self.markers() if m["start"] < n and name in m.get("checksums", {})] if verify else []
        stop = min(arr.shape[0], max([n, *(m["end"] for m in markers)]))
        try:
            data = arr[:stop]
        except Exception as exc:  # noqa: BLE001 - a codec or a chunk's size says the chunk is damaged
            raise CorruptFile(f"{self.store.url(self.group_rel)}/{self.role}/{name}: a chunk of rows 0..{stop} cannot be "
                              f"read ({type(exc).__name__}: {exc}); {self._fix()}") from None
        for m in markers:
            block = np.ascontiguousarray(data[m["start"] : m["end"]])
            if hashlib.sha256(block.tobytes()).hexdigest() != m["checksums"][name]:
                raise CorruptFile(
                    f"{self.store.url(self.group_rel)}/{self.role}/{name} rows {m['start']}..{m['end']}: the data "
                    f"differs from the sha256 in their marker {self.store.url(self._marker_of(m))}; "
                    f"{self._fix(self._marker_of(m))}")
        return data[:n]

    def _marker_of(self, marker: dict) -> str:
        return f"{self.marker_rel}/{marker['start']:07d}-{marker['end']:07d}.json"

    def _fix(self, marker_rel: str | None = None) -> str:
        what = f"remove the marker {self.store.url(marker_rel)}" if marker_rel else \
            f"remove the markers of the damaged rows under {self.store.url(self.marker_rel)}"
        return (f"to recompute those rows, {what} and re-run the stage that wrote them "
                "(`oracle-farm run CONFIG` redoes exactly the blocks without a marker)")

    def verify(self, n_models: int) -> list[str]:
        """Problems found by recomputing each marker's checksums (empty when all is well)."""
        import numpy as np

        problems = []
        for m in self.markers():
            if m["start"] >= n_models:
                continue
            for name, digest in m["checksums"].items():
                data = np.ascontiguousarray(self.array(name)[m["start"] : m["end"]])
                if hashlib.sha256(data.tobytes()).hexdigest() != digest:
                    problems.append(f"{self.role}/{name} rows {m['start']}..{m['end']}: checksum mismatch")
        return problems
