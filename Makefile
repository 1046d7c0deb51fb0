# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run stack test test-fast lint system-deps bench chaos compose-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[prod,test]'
	touch $(STAMP)

install: $(STAMP)

## Start the whole pipeline on embedded backends at http://127.0.0.1:8080
run: install
	$(BIN)/dsched run all

## The production topology on this machine (no Docker): Kafka, Cassandra, etcd, ElasticMQ, S3 (moto), Prometheus
## and separate dsched processes; API on DSCHED_PORT (default 8080), data under .dsched/stack. Ctrl-C stops it.
stack: install system-deps
	$(BIN)/python -m dsched.libs.servers.stack

## Real servers the tests start on free 127.0.0.1 ports: etcd (Debian), Java 17 + Maven (Debian) for the jars of
## Kafka, Cassandra and ElasticMQ (deploy/jars/*/pom.xml, cached in .cache/jars); moto comes from PyPI;
## Prometheus and promtool (Debian's prometheus) for the dashboard and alert-rule tests.
system-deps: install
	@missing=""; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v java >/dev/null 2>&1 || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn  >/dev/null 2>&1 || missing="$$missing maven"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing$$missing (Debian)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing:$$missing: run 'sudo apt-get install -y$$missing' and retry"; exit 1; \
	  fi; \
	fi
	$(BIN)/python -m dsched.libs.servers.jars

## Install what the tests need, start the real local servers (from fixtures), run the whole suite.
test: install system-deps lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m dsched.bench.fire_lag --jobs 20000 --rate 1000

chaos: install system-deps
	$(BIN)/python -m dsched.chaos --long

## On a host with a Docker engine: the production stack of deploy/, acceptance + contract suites against it.
compose-test: install
	$(MAKE) -C deploy compose-test

clean:
	rm -rf $(VENV) .dsched .pytest_cache .mypy_cache .ruff_cache *.egg-info
