# uv is pinned and bootstrapped into .tools/; the project's environment (.venv) comes from uv.lock.
# Settings come from the environment (see config.py); TEST_DATABASES (e.g. sqlite,mariadb) reaches
# the tests as it is, from the environment or the command line (`make test TEST_DATABASES=sqlite`).

PYTHON ?= python3
UV_VERSION := 0.13.8
UV := .tools/bin/uv
VENV_PYTHON := .venv/bin/python
ARGS ?=
BENCH_ARGS ?=
PYTEST_ARGS ?=
QUICK ?=

.PHONY: install up up-cluster test test-cluster test-topology bench lock clean

install: $(UV)
	@$(UV) sync --frozen --quiet

# A file target: runs only while .tools/bin/uv is missing.
$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

up: install
	$(VENV_PYTHON) -m stack.up $(ARGS)

# nginx in front of two API instances, a Redis Cluster cache, a broker Redis, two workers, two beats
# (one schedules), Flower. Installs nginx (Debian's package) when missing. See stack/cluster.py.
up-cluster: install
	$(VENV_PYTHON) -m stack.cluster $(ARGS)

test: install
	@echo "TEST_DATABASES=$${TEST_DATABASES:-(unset: the tests' default)}"
	$(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

# The cache, API and worker tests with the cache on a private Redis Cluster (3 masters + replicas).
# The HTTP-level tests through nginx against `make up-cluster` (tests/conftest.py: TEST_TOPOLOGY).
test-topology: install
	TEST_TOPOLOGY=cluster $(VENV_PYTHON) -m pytest tests/test_api_*.py tests/test_cache_categories.py tests/test_cache_ops.py $(PYTEST_ARGS)

test-cluster: install
	TEST_REDIS=cluster $(VENV_PYTHON) -m pytest tests/test_cache_*.py tests/test_api_*.py tests/test_worker_pipeline.py $(PYTEST_ARGS)

# Installs wrk (Debian's package) itself when missing; its own database and redis-server. BENCHMARKS.md.
bench: install
	$(VENV_PYTHON) -m bench $(if $(QUICK),--quick,) $(BENCH_ARGS)

lock: $(UV)
	$(UV) lock

clean:
	rm -rf .venv .tools var
