# CredScope commands. `make run` and `make test` are the README's two set-up commands.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
MODEL_DIR ?= models
PORT   ?= 50051
TELEMETRY_PORT ?= 9464
METRICS_DIR ?= metrics
PROTOS := $(wildcard proto/credscope/v1/*.proto)

.PHONY: help venv install install-dev model run test coverage proto proto-check buf-lint buf-breaking ruff lint \
        typecheck bandit pip-audit ci bench clean

# The CI gates (.ci/run runs them in this order, each named in its output; `make ci` runs .ci/run).
LINT_PATHS := server client telemetry tools tests
#: `make test COVERAGE=1`: the same suite, measuring server/, client/ and telemetry/ (the server and sidecar
#: processes the tests start included: [tool.coverage.run] patch = subprocess), failing under 85%.
COVERAGE ?=
COV_ARGS := --cov --cov-report=term-missing:skip-covered --cov-report=xml:coverage.xml --cov-fail-under=85

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 14

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/activate setup.cfg pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/bin/activate  ## create the virtualenv

install: $(VENV)/.installed  ## install the credscope distribution (editable)

install-dev: $(VENV)/.installed-dev  ## install with the test and lint tools

$(MODEL_DIR)/ACTIVE: | $(VENV)/.installed
	$(VENV)/bin/credscope-train --model-dir $(MODEL_DIR)

model: $(MODEL_DIR)/ACTIVE  ## build the model if it is missing (synthetic Home Credit-shaped data)

run: install model  ## start the server on :$(PORT) and the telemetry sidecar on :$(TELEMETRY_PORT), embedded backends
	@echo "Calls need an API key. Make a demo key in another shell:  export CREDSCOPE_API_KEY=\$$($(VENV)/bin/credscope-keys create --name demo --tier free)"
	@rm -rf $(METRICS_DIR) && mkdir -p $(METRICS_DIR)
	@$(VENV)/bin/credscope-telemetry serve --port $(TELEMETRY_PORT) --metrics-dir $(METRICS_DIR) --model-dir $(MODEL_DIR) & \
	  tpid=$$!; trap 'kill $$tpid 2>/dev/null; wait $$tpid 2>/dev/null' EXIT INT TERM; \
	  $(VENV)/bin/credscope-server --port $(PORT) --model-dir $(MODEL_DIR) --metrics-dir $(METRICS_DIR)

test: install-dev  ## run the whole test suite (COVERAGE=1: with coverage, failing under 85%)
	$(PY) -m pytest $(if $(COVERAGE),$(COV_ARGS))

coverage:  ## the test suite with coverage of server, client and telemetry (fails under 85%)
	$(MAKE) test COVERAGE=1

proto: install-dev  ## regenerate the committed Python stubs from proto/
	$(PY) -m tools.protogen

proto-check: install-dev  ## fail if the committed stubs are stale
	$(PY) -m tools.protogen --check

node_modules/.bin/buf: package.json
	npm install --no-audit --no-fund --silent
	touch $@

buf-lint: node_modules/.bin/buf  ## buf lint (STANDARD + COMMENTS)
	node_modules/.bin/buf lint

buf-breaking: node_modules/.bin/buf  ## buf breaking against the last v* release tag (skipped when there is none)
	@tag=$$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || true); \
	if [ -z "$$tag" ]; then echo "buf breaking: no v* release tag yet, nothing to compare with (skipped)"; \
	else gitdir=$$(git rev-parse --path-format=absolute --git-common-dir); \
	  echo "buf breaking against $$tag"; \
	  node_modules/.bin/buf breaking --against "$$gitdir#format=git,tag=$$tag"; fi

ruff: install-dev  ## ruff (lint rules in pyproject.toml)
	$(VENV)/bin/ruff check $(LINT_PATHS)

lint: ruff buf-lint  ## ruff and buf lint

typecheck: install-dev  ## mypy on server, client and telemetry (config in pyproject.toml)
	$(VENV)/bin/mypy

bandit: install-dev  ## bandit security lint: any finding of medium or high severity fails
	@err=$$(mktemp); $(VENV)/bin/bandit -q -r server client telemetry tools -ll 2>$$err; rc=$$?; \
	  grep -v "nosec encountered" $$err >&2; rm -f $$err; \
	  if [ $$rc -eq 0 ]; then echo "bandit: no medium- or high-severity finding"; fi; exit $$rc

pip-audit: install-dev  ## known vulnerabilities of the dependencies: high fails (PIP_AUDIT_STRICT=1: so does no answer)
	$(PY) -m tools.audit_deps $(if $(PIP_AUDIT_STRICT),--strict)

ci:  ## what CI runs: .ci/run (services, then every gate; CI=true, so service tests fail, not skip)
	bash .ci/run

# MLServer (the bench's peer) lives in its own virtualenv: its dependencies conflict with ours. If it
# cannot be installed the bench still runs and reports the MLServer rows as skipped, with the reason.
# scikit-learn is the version the pickled pipeline was made with; uvloop<0.22 because MLServer 1.7.1's
# inference workers (parallel_workers >= 1) call asyncio.get_event_loop(), which uvloop 0.22+ refuses.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q mlserver==1.7.1 mlserver-sklearn==1.7.1 scikit-learn==1.9.1 lightgbm==4.7.0 uvloop==0.21.0 \
		|| echo "make bench: MLServer could not be installed in $(BENCH_VENV); the bench will skip it"
	touch $@

bench: install model $(BENCH_VENV)/.installed  ## benchmark vs an echo server and MLServer (BENCH_ARGS="--help")
	$(VENV)/bin/credscope-bench --model-dir $(MODEL_DIR) --mlserver-venv $(BENCH_VENV) $(BENCH_ARGS)

clean:  ## remove the virtualenv and build leftovers
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info .coverage .coverage.* coverage.xml
