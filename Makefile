# Two commands: `make demo` and `make test`. Each installs what is missing first, and nothing when
# everything is there (Debian packages for FFCV, a .venv, the package with the exact versions of
# constraints.txt: pyproject.toml itself only gives ranges).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev
DEMO_CONFIG ?= configs/digits.yaml

.PHONY: demo study test test-all setup apt bench clean-store gpu-check gpu-wheels

demo: setup
	$(BIN)/oracle-farm run $(DEMO_CONFIG)
	$(BIN)/oracle-farm status $(DEMO_CONFIG)

study: setup  ## the digits study: every kind's tuning set, the full grids, the upper bound (decision 32)
	$(BIN)/oracle-farm run configs/digits-study.yaml
	$(BIN)/oracle-farm status configs/digits-study.yaml

test: setup
	$(BIN)/pytest

test-all: setup  ## the default suite plus the slow science and reliability checks
	$(BIN)/pytest -m ''

setup: apt $(STAMP)

apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]' -c constraints.txt
	touch $(STAMP)

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/klom_speed.py
	$(BIN)/python bench/fit_speed.py

# The GPU check (bench/gpu_check.py) on any GPU box with PyTorch: it needs no Ray, Zarr or FFCV, only the
# wheels below where the box lacks them (fetched once into .whl/, ignored by git, for the box's python3;
# GPU_PY=3.12 fetches for another Python, e.g. to carry them to a machine without network).
GPU_PY ?=
GPU_WHEELS := pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.15.0
gpu-wheels: .whl/.fetched
.whl/.fetched:
	python3 -m pip download -q --no-deps --only-binary=:all: -d .whl \
	  $(if $(GPU_PY),--python-version $(GPU_PY) --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64) \
	  $(GPU_WHEELS)
	touch $@

gpu-check: gpu-wheels
	python3 -m pip install -q --no-index --no-deps --upgrade --target .whl/site .whl/*.whl
	PYTHONPATH=.whl/site:. python3 bench/gpu_check.py --out bench/out

clean-store:
	rm -rf store store-tiny
