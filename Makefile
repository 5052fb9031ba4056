# The README's two commands: `make run` and `make test`. CI runs `.ci/run`, which calls `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STATE ?= .hsmgw
LISTEN ?= 127.0.0.1:50051
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps venv fleet protos lint clean

run: setup fleet
	$(VENV)/bin/hsmgw serve --config $(STATE)/hsmgw.toml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

setup: system-deps venv

# SoftHSM2 (the local HSM) and p11-kit; installed only when missing.
system-deps:
	@if ! command -v softhsm2-util >/dev/null || [ ! -e /usr/lib/softhsm/libsofthsm2.so ]; then \
		echo "installing SoftHSM2 (needs root or sudo)"; \
		SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends softhsm2 p11-kit; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

fleet: venv
	$(VENV)/bin/hsmgw fleet init --state-dir $(STATE) --listen $(LISTEN)

# Regenerate the Python stubs from protos/ (a test fails when they drift).
protos: venv
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/hsmgw/v1/*.proto

lint: venv
	$(VENV)/bin/ruff check gateway router tests

clean:
	rm -rf $(VENV) $(STATE)
