# Two commands on a fresh machine with only python3 and make:
#   make demo   train FPN and EFPN on built-in synthetic data and compare them
#   make test   run the test suite
# uv is bootstrapped into .tools/ when it is not on PATH; the locked environment lives in .venv.

PYTHON ?= python3
TOOLS := .tools
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(TOOLS)/uv/bin/uv
endif
VENV_STAMP := .venv/.efpn-synced
RUN := $(UV) run --locked --no-sync

.PHONY: all demo test lint sync clean

all: test

$(TOOLS)/uv/bin/uv:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(TOOLS)/uv uv

$(VENV_STAMP): pyproject.toml uv.lock | $(if $(shell command -v uv 2>/dev/null),,$(TOOLS)/uv/bin/uv)
	$(UV) sync --locked --extra test
	@touch $@

sync: $(VENV_STAMP)

demo: $(VENV_STAMP)
	$(RUN) efpn demo --out runs/demo

test: $(VENV_STAMP)
	$(RUN) pytest -q

lint: $(VENV_STAMP)
	$(RUN) ruff check src tests
	$(RUN) ruff format --check src tests

clean:
	rm -rf .venv $(TOOLS) runs .pytest_cache
