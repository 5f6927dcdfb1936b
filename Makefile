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

.PHONY: install up up-cluster test test-cluster test-topology bench ops-check faults soak fuzz lock clean

# Compiled at install: every process (each gunicorn worker, Celery, a restart after a crash) then
# starts in 0.6 s, not 1.6 s, where bytecode is never written (PYTHONDONTWRITEBYTECODE).
install: $(UV)
	@$(UV) sync --frozen --quiet --compile-bytecode

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

# The dashboard against a real Prometheus (Debian's, installed when missing) scraping a running
# stack on private servers: every panel's expression returns data, every rule evaluates.
ops-check: install
	$(VENV_PYTHON) -m ops.check $(ARGS)

# Each fault on a fresh `make up` stack under load (its own MariaDB database and redis-servers);
# ONLY=cache-restart,beat-kill runs some. Not part of `make test`. RELIABILITY.md.
ONLY ?=
faults: install
	$(VENV_PYTHON) -m faults $(if $(ONLY),--only $(ONLY),)

# The benchmark's mixed load for MINUTES (default 30), sampling memory, keys, connections and the
# outbox backlog. RELIABILITY.md.
MINUTES ?= 30
soak: install
	$(VENV_PYTHON) -m faults.soak --minutes $(MINUTES)

# The long hostile-client run (RELIABILITY.md, Fuzzing): schemathesis over /openapi.json, every phase
# (stateful included), authenticated; and 200 oversized bodies per client on keep-alive connections.
FUZZ_EXAMPLES ?= 100
fuzz: install
	SCHEMATHESIS_MAX_EXAMPLES=$(FUZZ_EXAMPLES) SCHEMATHESIS_STATEFUL_EXAMPLES=$(FUZZ_EXAMPLES) \
	OVERSIZE_TRIES=200 $(VENV_PYTHON) -m pytest -s -q tests/test_api_schemathesis.py \
	tests/test_server_edges.py $(PYTEST_ARGS)

lock: $(UV)
	$(UV) lock

clean:
	rm -rf .venv .tools var
