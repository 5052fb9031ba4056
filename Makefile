# The README's two commands: `make run` and `make test`. CI runs `.ci/run`, which calls `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STATE ?= .hsmgw
LISTEN ?= 127.0.0.1:50051
STAMP := $(VENV)/.installed

.PHONY: run test setup system-deps venv fleet protos lint clean bench

run: setup fleet
	$(VENV)/bin/hsmgw serve --config $(STATE)/hsmgw.toml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark (docs/performance.md): a throw-away fleet, the gateway with 2 workers next to
# direct PKCS #11, h2load (nghttp2-client, installed here if missing) and a p11-kit peer.
bench: setup
	@command -v h2load >/dev/null || { SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends nghttp2-client; }
	$(VENV)/bin/hsmgw bench $(BENCH_ARGS)

setup: system-deps venv

# SoftHSM2 (the local HSM), p11-kit, what the chaos tests compile their fault-injecting
# PKCS #11 module with, and Python's venv module (Debian ships it apart from python3);
# installed only when missing.
SYSTEM_PACKAGES := softhsm2 p11-kit libp11-kit-dev gcc libc6-dev python3-venv
system-deps:
	@if ! command -v softhsm2-util >/dev/null || [ ! -e /usr/lib/softhsm/libsofthsm2.so ] \
		|| [ ! -e /usr/include/p11-kit-1/p11-kit/pkcs11.h ] || ! command -v gcc >/dev/null \
		|| ! python3 -c 'import ensurepip' 2>/dev/null; then \
		echo "installing $(SYSTEM_PACKAGES) (needs root or sudo)"; \
		SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); \
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

# ruff everywhere; mypy --strict on the engine and the gateway (generated hsmgw/v1 excluded).
lint: venv
	$(VENV)/bin/ruff check gateway router tests
	$(VENV)/bin/mypy router gateway

clean:
	rm -rf $(VENV) $(STATE)
