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

.PHONY: install up test bench fuzz lock clean

install: $(UV)
	@$(UV) sync --frozen --quiet

# A file target: runs only while .tools/bin/uv is missing.
$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

up: install
	$(VENV_PYTHON) -m stack.up $(ARGS)

test: install
	@echo "TEST_DATABASES=$${TEST_DATABASES:-(unset: the tests' default)}"
	$(VENV_PYTHON) -m pytest $(PYTEST_ARGS)

# Installs wrk (Debian's package) itself when missing; its own database and redis-server. BENCHMARKS.md.
bench: install
	$(VENV_PYTHON) -m bench $(if $(QUICK),--quick,) $(BENCH_ARGS)

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
