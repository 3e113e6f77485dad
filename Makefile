# sagkit: two commands on a fresh machine.
#   make lab     the notebooks in JupyterLab          (make report: the same experiments, headless)
#   make test    lint, unit tests and every notebook under nbval
PY      := python3
VENV    := .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.13.0
export OMP_NUM_THREADS ?= 1

.PHONY: venv lab report test lint format notebooks-test unit-test bench browser clean

$(BIN)/sagkit: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel, not gigabytes of CUDA packages.
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[notebooks,dev]"
	touch $@

venv: $(BIN)/sagkit

lab: venv
	$(BIN)/jupyter lab notebooks/

report: venv
	$(BIN)/sagkit report --out report

bench: venv
	$(BIN)/sagkit bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/nbstripout --verify notebooks/*.ipynb

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Debian's Chromium for the JupyterLab browser test (a browser downloaded by a test tool will
# not install here). Without root or apt the test is skipped outside CI.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "could not install chromium: the browser test will be skipped"

unit-test: venv browser
	$(BIN)/pytest -q tests

notebooks-test: venv
	SAGKIT_FAST=1 $(BIN)/pytest -q --nbval-lax --nbval-current-env notebooks/

test: lint unit-test notebooks-test

clean:
	rm -rf $(VENV) report .pytest_cache
