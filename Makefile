# Two commands: `make demo` and `make test`. Each installs what is missing first, and nothing when
# everything is there (Debian packages for FFCV, a .venv, the package with its pinned torch).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PKGS := pkg-config libturbojpeg0-dev libopencv-dev
DEMO_CONFIG ?= configs/digits.yaml

.PHONY: demo test test-all setup apt bench clean-store

demo: setup
	$(BIN)/oracle-farm run $(DEMO_CONFIG)
	$(BIN)/oracle-farm status $(DEMO_CONFIG)

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

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

bench: setup
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/klom_speed.py
	$(BIN)/python bench/fit_speed.py

clean-store:
	rm -rf store store-tiny
