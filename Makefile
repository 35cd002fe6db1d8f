# mtorl: the two commands of the README do all the set-up on a fresh clone.
#   make demo   - virtualenv + install, embedded object store, local Ray, the main job end to end
#   make test   - virtualenv + install, the whole test suite
#   make manifests - KubeRay manifests rendered into $(MANIFESTS_DIR) (values: VALUES=file, or the environment)
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?=
SOURCE ?=
DEMO_DIR ?= demo-output
DEMO_ARGS ?=
# torch: pinned to the CPU build that pip finds on a machine without a GPU (no multi-GB CUDA download).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
MANIFESTS_DIR ?= build/manifests
VALUES ?=

.PHONY: install demo test test-deps test-unit test-integration bench manifests clean store-up store-down

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,store]"
	$(BIN)/python -c "import mtorl, ray, torch; print('installed mtorl', mtorl.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mtorl.demo --dir $(DEMO_DIR) $(if $(DATA),--data $(DATA)) $(if $(SOURCE),--source $(SOURCE)) $(DEMO_ARGS)

# lint: ruff, then mypy (strict on the pure cores); `make test` runs it before pytest.
.PHONY: lint test-fast
lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m mypy


# The HTML report test renders the page in Debian's headless chromium: installed here when absent (as root).
test-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null \
	      || echo "warning: could not install chromium; the HTML report's browser test will be skipped"; \
	  else echo "note: chromium not found and not root: the HTML report's browser test will be skipped"; fi

# The suite runs in TEST_WORKERS processes (pytest-xdist), each with its own store and Ray; a file stays in
# one process (--dist loadfile) so module fixtures start once, and the slowest files start first
# (tests/conftest.py orders them; --no-loadscope-reorder keeps that order). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: $(STAMP) lint test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 --durations=25 \
	  $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) tests

# test-fast: the unit tests only (no Ray cluster, no object store).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=300 --durations=10 tests/unit

test-unit: test-fast

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

bench: $(STAMP)
	$(BIN)/python -m mtorl.bench $(BENCH_ARGS)

manifests: $(STAMP)
	$(BIN)/python -m mtorl.manifests --out $(MANIFESTS_DIR) $(foreach f,$(VALUES),--values $(f))

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
