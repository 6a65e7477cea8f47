# Everything installs itself: a fresh machine needs only python3 and make.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: run run-ctr lint test test-fast test-cluster test-faults bench bench-all bench-join bench-net install clean

$(PY):
	python3 -m venv $(VENV) || (apt-get update -q && apt-get install -y -q python3-venv && python3 -m venv $(VENV))

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# System packages the tests use: nftables (fault tests cut links inside a private
# network namespace; root only), libfuse2 + fusermount (the power-loss file system)
# and Chromium (the dashboard test drives a real browser).
SYSDEPS := $(VENV)/.sysdeps
$(SYSDEPS): | $(PY)
	@if [ "$$(id -u)" = 0 ] && ! command -v nft >/dev/null; then \
		(apt-get update -q && apt-get install -y -q nftables iproute2) >/dev/null; fi
	@if [ "$$(id -u)" = 0 ] && ! ldconfig -p | grep -q libfuse.so.2; then \
		(apt-get update -q && apt-get install -y -q libfuse2 fuse) >/dev/null; fi
	@if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >/dev/null; fi
	touch $@

## A local 3-replica cluster on loopback, plus a trainer working against it.
run: install
	$(VENV)/bin/paramstore dev --replicas 3 --http-port 8700 --data-dir data/dev \
		--then "$(PY) examples/train_digits.py --workers 4" $(if $(EXIT_AFTER),--exit-after)

## The same cluster, training a click-through-rate model with embedding tables (examples/train_ctr.py).
run-ctr: install
	$(VENV)/bin/paramstore dev --replicas 3 --http-port 8700 --data-dir data/dev \
		--then "$(PY) examples/train_ctr.py --workers 4" $(if $(EXIT_AFTER),--exit-after)

## ruff (lint rules, import order, format) and mypy (strict: store/, api/ and paramstore/).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy store api paramstore

## The whole suite (unit, API and real multi-process cluster tests).
test: install $(SYSDEPS)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

## Unit and in-process API tests only (under a minute).
test-fast: install
	$(PY) -m pytest -q -m "not cluster" tests

test-cluster: install $(SYSDEPS)
	$(PY) -m pytest -q -m cluster tests

## Jepsen-style fault scenarios alone (real partitions need root). POWER_CUTS=200 for a longer power-cut loop;
## the power-loss file system needs libfuse2 and fusermount (SYSDEPS installs them as root).
POWER_CUTS ?= 20
test-faults: install $(SYSDEPS)
	POWER_CUTS=$(POWER_CUTS) $(PY) -m pytest -q -m faults tests

## Benchmarks side by side with etcd, Redis, raw pysyncobj and loopback TCP (not part of make test).
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): bench/requirements.txt Makefile $(STAMP)
	@command -v etcd >/dev/null && command -v redis-server >/dev/null && command -v iperf3 >/dev/null && \
		command -v fio >/dev/null || (apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server redis-server iperf3 fio) >/dev/null
	$(PY) -m pip install -q -r bench/requirements.txt
	touch $@

## The sections with an issue-15 target and issue 12's tables, interleaved across systems (<= 10 min on 2 cores).
bench: $(BENCH_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

## make bench + memory, recovery, CTR training and the gloo comparison at full size (~30 min).
bench-all: $(BENCH_STAMP)
	$(PY) -m bench --only all $(BENCH_ARGS)

## A 4th replica joins a cluster holding 512 MB, under write load (~2 min).
bench-join: $(BENCH_STAMP)
	$(PY) -m bench.join $(BENCH_ARGS)

## Replicas and workers on their own hosts (network namespaces) behind 1 Gbit/s links shaped with tc:
## step time of a 100 M-parameter job against `paramstore plan`, a 256 MB push and pull (root; 10-20 min).
bench-net: install $(SYSDEPS)
	$(PY) -m bench.netsim $(BENCH_ARGS)

clean:
	rm -rf $(VENV) data *.egg-info
