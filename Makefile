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

.PHONY: run test test-asan fuzz bench lint setup system-packages build kit clean

run: setup kit
	$(NETNS) $(PY) -m tools.demo

# The plot extra is installed for the tests too, so the plot test runs in CI.
test: setup kit $(PLOT_STAMP)
	$(PY) -m ruff check vhostnet tests tools bench testkit fuzz
	$(PY) -m tools.check_imports
	$(NETNS) $(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

# Coverage-guided fuzzing (atheris) of every target in fuzz/targets.py, the budget
# shared out among them (2 at a time); a crashing input lands in fuzz/crashes/.
# `make test` runs a few seconds of each (tests/fuzz/test_fuzz_short.py).
FUZZ_SECONDS ?= 600
fuzz: setup
	$(NETNS) $(PY) -m fuzz.run --seconds $(FUZZ_SECONDS) --jobs 2 $(FUZZ_ARGS)

# The Cython kernels built with AddressSanitizer and UndefinedBehaviorSanitizer in a
# copy of the tree (build/asan-tree), then the ring, hostile-frame, fast-path and fuzz
# corpus tests run there; any report fails the run.
ASAN_TREE := build/asan-tree
ASAN_TESTS := tests/virtqueue tests/stack/test_hostile_frames.py tests/tcp/test_tcp_fast.py \
	tests/tcp/test_tcp_direct_rx.py tests/hostio/test_udp_fast.py \
	tests/hostio/test_udp_fast_rx.py tests/fuzz/test_fuzz_replay.py
test-asan: setup
	rm -rf $(ASAN_TREE) && mkdir -p $(ASAN_TREE)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(ASAN_TREE)
	cd $(ASAN_TREE) && CFLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -O1" \
		LDFLAGS="-fsanitize=address,undefined" $(CURDIR)/$(PY) setup.py -q build_ext --inplace
	cd $(ASAN_TREE) && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:handle_sigbus=0:allow_user_segv_handler=1 \
		UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
		$(CURDIR)/$(NETNS) $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider $(ASAN_TESTS)

# Every case runs against Debian trixie's passt too, interleaved (--no-passt: not),
# and dpdk-testpmd (installed here) plays a VM-less front-end (case testpmd).
# --guest boots a TCG guest running iperf3 at MTU 1500 and 65520 (about 10 of the run's
# ~13 minutes with passt; --guest-stream adds the same on -netdev stream); the
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
	$(PY) -m ruff check vhostnet tests tools bench testkit fuzz

setup: system-packages $(STAMP) build $(VENV)/bin/vhostnet

system-packages:
	@sh tools/system-packages.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "setuptools>=77" wheel build "Cython>=3.0" "numpy>=1.26" "uvloop>=0.19" "pytest>=8" ruff "atheris>=2.3"
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
