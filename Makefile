# svcproxy developer entry points. `make test` and `make demo` work on a fresh
# machine (as root): they install what they need, then run.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: all venv host-deps toolchain lint typecheck crds test test-unit test-dataplane test-e2e test-kind images kind-up kind-down conformance demo demo-kind clean

all: test

# The product and the lab (its own distribution, never in the wheel or the images), both editable.
# A new venv first gets the Debian packages (python3-venv on a bare Debian): hack/setup.sh packages.
$(VENV)/.stamp: pyproject.toml lab/pyproject.toml
	@test -x $(BIN)/python || { PY=$(PY) bash hack/setup.sh packages && $(PY) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]' -e ./lab
	@touch $@

venv: $(VENV)/.stamp

# Debian packages, the lab's Kubernetes binaries (cached by version outside
# the repo) and the user-mode-linux kernel: see hack/setup.sh.
host-deps:
	bash hack/setup.sh

lint: venv
	$(BIN)/ruff check operator lab tests benchmarks
	$(BIN)/lint-imports

typecheck: venv
	$(BIN)/mypy

crds: venv
	$(BIN)/svcproxy crds --output-dir crds
	$(BIN)/svcproxy crds --output-dir charts/svcproxy/crds
	cp crds/kopf-peering.yaml charts/svcproxy/crds/

test-unit: venv
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

test-dataplane: venv host-deps
	$(BIN)/pytest -q tests/dataplane $(PYTEST_ARGS)

test-e2e: venv host-deps
	$(BIN)/pytest -q tests/e2e $(PYTEST_ARGS)

# The kind cluster: every image built here (no registry), the chart's Pods on real kubelets.
test-kind: venv host-deps
	$(BIN)/pytest -q tests/kind $(PYTEST_ARGS)

images: venv host-deps
	bash hack/images.sh

kind-up: venv host-deps
	bash hack/kind.sh up

kind-down:
	bash hack/kind.sh down

# Kubernetes' own conformance specs for Services, DNS, EndpointSlices, the API proxy and Pod
# networking, on the kind cluster, recorded in docs/conformance.md (hack/conformance.sh).
# MODE=none|iptables|userspace picks the cluster-wide default policy, TIMEOUT its minutes.
# Not part of `make test`: it builds e2e.test (long when cold) and a run can take its whole timeout.
MODE ?= none
TIMEOUT ?= 40
conformance: venv host-deps
	MODE=$(MODE) TIMEOUT=$(TIMEOUT) PYTHON=$(BIN)/python bash hack/conformance.sh

# Everything, the kind suite included: it builds the images (cached by content), creates
# the cluster, and its last test deletes it again. The kind suite runs in a pytest session
# of its own, after the e2e session's lab is down: its teardown test compares the machine
# before and after, and the lab's links and rules must not be part of that picture.
# The machine has one lab (fixed addresses), and `make demo` leaves its lab up to look
# around: the tests take it down first rather than fail on "another lab runs".
DEMO_STATE := $(HOME)/.cache/svcproxy/labs/demo
test: venv host-deps lint typecheck
	@if [ -f $(DEMO_STATE)/lab.json ]; then \
	  echo "make test: taking the demo's lab down first (one lab per machine)"; \
	  $(BIN)/svcproxy lab down --state-dir $(DEMO_STATE); fi
	@rc=0; $(BIN)/pytest -q tests --ignore=tests/kind $(PYTEST_ARGS) || rc=1; \
	  $(BIN)/pytest -q tests/kind $(PYTEST_ARGS) || rc=1; exit $$rc

demo: venv host-deps
	$(BIN)/svcproxy demo

# The same demo on the kind cluster of `make kind-up` (it says so and stops when there is none).
demo-kind: venv
	$(BIN)/svcproxy demo --kind

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
