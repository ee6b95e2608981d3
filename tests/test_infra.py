"""infra/: the image, the Ray cluster launcher file and the KubeRay RayJob agree with each other and with
the repository (entrypoints, configs, Debian packages, pins, image name), and hold no credential."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import REPO

INFRA = REPO / "infra"
STAGES = ("prepare", "train", "fit", "unlearn", "evaluate", "report", "run")
SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# ------------------------------------------------------------------------------------------ parsing
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.strip().partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
    return out


def docker_args() -> dict[str, str]:
    return dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG" and "=" in a)


def docker_env() -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    """name -> version for every `name==version` line of constraints.txt (the local install's exact
    versions; pyproject.toml's dependencies are ranges)."""
    lines = [line.split("#")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()]
    return dict(line.split("==", 1) for line in lines if "==" in line)


def test_library_dependencies_are_ranges_and_the_local_install_pins_them():
    """A library pins nothing (a cluster's own torch build; Python 3.11 and later, as zarr 3 needs);
    `make` installs with constraints.txt, whose every pin is a dependency and within its range."""
    from packaging.requirements import Requirement

    project = pyproject()["project"]
    assert project["requires-python"] == ">=3.11"
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    assert all("==" not in str(r.specifier) for r in deps.values()), [str(r) for r in deps.values()]
    for name, version in pins().items():
        assert name in deps and deps[name].specifier.contains(version), (name, version, str(deps[name]))
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def makefile_apt_packages() -> list[str]:
    match = re.search(r"^APT_PKGS\s*:?=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "the Makefile defines APT_PKGS"
    return match.group(1).split()


def cluster() -> dict:
    return yaml.safe_load((INFRA / "cluster.yaml").read_text())


def rayjob() -> dict:
    return yaml.safe_load((INFRA / "rayjob.yaml").read_text())


def rayjob_containers() -> list[dict]:
    spec = rayjob()["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["containers"]]


# ------------------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_base_python_and_debian_packages():
    instructions = dockerfile()
    base = next(a for i, a in instructions if i == "FROM")
    base = re.sub(r"\$\{(\w+)\}", lambda m: docker_args()[m.group(1)], base)
    assert base.startswith("nvidia/cuda:"), base
    runs = " ".join(a for i, a in instructions if i == "RUN")
    installs = " ".join(re.findall(r"apt-get install ([^&]+)", runs))
    for package in ["python3.11", "python3.11-venv", *makefile_apt_packages()]:
        assert package in installs.split(), f"the Dockerfile does not apt-get install {package}"
    assert "python3.11 -m venv" in runs


def test_dockerfile_installs_the_package_with_the_pyproject_pins():
    runs = [a for i, a in dockerfile() if i == "RUN"]
    installs = [r for r in runs if "pip install" in r]
    assert any(re.search(r"pip install \.(\s|$)", r) for r in installs), "the package is installed with `pip install .`"
    want = pins()
    assert {"torch", "torchvision"} <= set(want)
    for name in ("torch", "torchvision"):
        found = {v for r in installs for v in re.findall(rf"(?<![\w-]){name}==([\w.+-]+)", r)}
        assert found == {want[name]}, f"{name}: Dockerfile pins {found}, pyproject.toml {want[name]}"
    ray = docker_args()["RAY_VERSION"]
    assert rayjob()["spec"]["rayClusterSpec"]["rayVersion"] == ray


def test_dockerfile_copies_what_exists_and_what_the_jobs_need():
    copies = [a.split() for i, a in dockerfile() if i == "COPY"]
    sources = [s for args in copies for s in args[:-1] if not s.startswith("--")]
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
    for needed in ("pyproject.toml", "pipeline", "jobs", "configs"):
        assert needed in sources, f"the image needs {needed}"


# ------------------------------------------------------------------------------------------ cluster files
def test_image_is_the_same_everywhere_and_tagged_with_the_package_version():
    image = cluster()["docker"]["image"]
    assert all(c["image"] == image for c in rayjob_containers()), [c["image"] for c in rayjob_containers()]
    assert image.rsplit(":", 1)[1] == pyproject()["project"]["version"]
    assert image in (INFRA / "Dockerfile").read_text(), "the Dockerfile's build command names the image"


def test_cluster_yaml_is_a_valid_launcher_config_with_gpu_workers():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = cluster()
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert config["max_workers"] >= max(t["max_workers"] for t in workers)
    for source in config.get("file_mounts", {}).values():
        assert source.startswith(("~", "/")), f"{source}: a file outside the repository (credentials), not in it"


def test_rayjob_runs_an_existing_entrypoint_with_a_valid_config():
    from pipeline.config import load_config

    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "jobs/run.py", "configs/cifar10.yaml"]
    assert (REPO / argv[1]).is_file() and (REPO / argv[2]).is_file()
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(REPO / argv[2], overrides)  # the overrides are valid
    assert cfg.store.startswith("s3://")
    workdir = next(a for i, a in dockerfile() if i == "WORKDIR")
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"] == workdir
    cache = docker_env()["ORACLE_FARM_CACHE"]
    for container in rayjob_containers():
        assert cache in [m["mountPath"] for m in container.get("volumeMounts", [])], container["name"]
    gpus = [g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
            if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpus, "a GPU worker group"


@pytest.mark.parametrize("stage", STAGES)
def test_a_job_entrypoint_per_stage(stage):
    path = REPO / "jobs" / f"{stage}.py"
    assert path.is_file(), path
    compile(path.read_text(), str(path), "exec")


def test_no_credential_in_infra_files():
    for path in INFRA.iterdir():
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{12,}", text), path
        for var in SECRET_VARS:  # never given a value in a file: only names, secret references, placeholders
            for value in re.findall(rf"{var}\s*[=:]\s*(\S+)", text):
                assert value.strip("\"'") in ("...", "$" + var, "${" + var + "}"), f"{path.name}: {var}={value}"
    for container in rayjob_containers():
        for item in container.get("env", []):
            assert item["name"] not in SECRET_VARS or "valueFrom" in item, item["name"]
        assert any("secretRef" in e for e in container.get("envFrom", [])), container["name"]


def test_paths_named_in_the_docs_exist():
    for doc in (INFRA / "README.md", REPO / "README.md"):
        text = doc.read_text()
        for rel in set(re.findall(r"\b((?:jobs|configs|infra|bench)/[\w./-]+\.(?:py|yaml|md|json))\b", text)):
            assert (REPO / rel).exists(), f"{doc.name} names {rel}, which does not exist"
