# sagkit: two commands on a fresh machine.
#   make lab     the notebooks in JupyterLab          (make report: the same experiments, headless)
#   make test    lint, unit tests and every notebook under nbval
# Both create .venv and install exactly the versions in requirements.lock.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
UV      := uv==0.13.9
TORCH   := torch==2.13.0
# uv installs into .venv; its cache is uv's own (UV_CACHE_DIR to move it).
UVPIP   := $(BIN)/uv pip
export OMP_NUM_THREADS ?= 1

.PHONY: venv lab report test lint format notebooks-test unit-test bench gpu-check browser lock clean

# torch is installed by pip, without its dependencies (they are in the lock): pip finds the
# CPU wheel where the machine keeps one, instead of gigabytes of CUDA packages. Everything
# else comes from the lock, exactly, through uv; sagkit itself is an editable install.
$(BIN)/sagkit: pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(UV)"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps "$(TORCH)"
	$(UVPIP) install --quiet --python $(BIN)/python -r requirements.lock
	$(UVPIP) install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

venv: $(BIN)/sagkit

# Refresh the pins on purpose. The resolution uses torch's CPU wheel (found where pip finds
# it, or in TORCH_WHEELS): resolving against the CUDA build would lock its CUDA packages.
TORCH_WHEELS ?= $(shell $(PY) -m pip config get global.find-links 2>/dev/null)
lock: venv
	$(UVPIP) compile pyproject.toml --extra notebooks --extra dev --python-version 3.11 \
		--no-emit-package torch $(if $(TORCH_WHEELS),--find-links $(TORCH_WHEELS)) \
		--custom-compile-command "make lock" --quiet -o requirements.lock

# --allow-root: JupyterLab refuses to start as root without it, and it changes nothing for
# other users. LAB_FLAGS passes more (for example --no-browser --port=8899).
LAB_FLAGS ?=
lab: venv
	$(BIN)/jupyter lab --allow-root $(LAB_FLAGS) notebooks/

report: venv
	$(BIN)/sagkit report --out report

bench: venv
	$(BIN)/sagkit bench

# On a CUDA machine: the CUDA tests, the engine benchmark, guided-sampling throughput in float32
# and bfloat16, the SD-sized memory benchmark and torch.compile, into results/gpu_check/
# (gpu_check.json and gpu_check.md). GPU_CHECK_FLAGS=--dry-run runs the wiring on the CPU.
GPU_CHECK_FLAGS ?=
gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py --out results/gpu_check $(GPU_CHECK_FLAGS)

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

# The tests run on TEST_WORKERS processes (pytest-xdist; CI has 2 cores, and every test runs
# on one thread, OMP_NUM_THREADS=1), the notebooks one file per worker: a notebook's cells
# share its kernel. TEST_WORKERS=0 runs everything in this process.
# The tests start many Pythons (workers, kernels, command-line runs): each imports torch and
# diffusers, so their bytecode is cached once, in .venv/pycache, also where the environment
# sets PYTHONDONTWRITEBYTECODE (which would have every process compile them again).
TEST_WORKERS ?= 2
PYCACHE := PYTHONDONTWRITEBYTECODE= PYTHONPYCACHEPREFIX=$(CURDIR)/$(VENV)/pycache
unit-test: venv browser
	$(PYCACHE) $(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal tests

notebooks-test: venv
	$(PYCACHE) SAGKIT_FAST=1 $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --nbval-lax \
		--nbval-current-env notebooks/

test: lint unit-test notebooks-test

clean:
	rm -rf $(VENV) report .pytest_cache
