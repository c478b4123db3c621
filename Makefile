# vhostnet: `make run` boots a demo guest through vhostnet, `make test` runs
# the whole suite. Both set up everything they need on a fresh Debian machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PLOT_STAMP := $(VENV)/.plot-installed
# Every test, benchmark and demo runs inside a private network namespace with
# only loopback, so nothing a guest sends can leave this machine.
NETNS  := $(PY) -m tools.netns --

.PHONY: run test bench lint setup system-packages build kit clean

run: setup kit
	$(NETNS) $(PY) -m tools.demo

# The plot extra is installed for the tests too, so the plot test runs in CI.
test: setup kit $(PLOT_STAMP)
	$(PY) -m ruff check vhostnet tests tools bench testkit
	$(PY) -m tools.check_imports
	$(NETNS) $(PY) -m pytest -ra $(PYTEST_ARGS)

# Every case runs against Debian trixie's passt too, interleaved (--no-passt: not),
# and dpdk-testpmd (installed here) plays a VM-less front-end (case testpmd).
# --guest boots a TCG guest running iperf3 (about 2 minutes of the run); the
# plot extra (matplotlib) is installed so `--plot` works, e.g.
# make bench BENCH_ARGS="--guest --json docs/bench.json --plot docs/bench.png"
BENCH_ARGS ?= --guest
bench: setup kit $(PLOT_STAMP)
	@sh tools/system-packages.sh bench
	$(NETNS) $(PY) -m bench $(BENCH_ARGS)

$(PLOT_STAMP): $(STAMP)
	$(PY) -m pip install -q matplotlib
	touch $(PLOT_STAMP)

lint: setup
	$(PY) -m ruff check vhostnet tests tools bench testkit

setup: system-packages $(STAMP) build $(VENV)/bin/vhostnet

system-packages:
	@sh tools/system-packages.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=77" wheel build "Cython>=3.0" "numpy>=1.26" "uvloop>=0.19" "pytest>=8" ruff
	touch $(STAMP)

# The `vhostnet` command in the venv: an editable install of this tree (the Cython
# kernels are built once here; `build` keeps them current), redone when pyproject changes.
$(VENV)/bin/vhostnet: pyproject.toml $(STAMP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The Cython kernels are built in place, so the source tree is the package.
build: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

kit: $(STAMP)
	$(PY) -m tools.guestkit
	$(PY) -m tools.guestkit_iperf

clean:
	rm -rf build $(VENV) vhostnet/*/*.so vhostnet/*.so ext/*.c
