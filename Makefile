# edge-agent: `make demo` sets everything up and runs the demo; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test check venv mosquitto tmux postgres clean simulate

# Dependencies come from the locks only (exact versions, hashes checked); the project itself
# is installed without dependencies. `make lock` regenerates the locks.
$(BIN)/edge-agent: pyproject.toml requirements.lock requirements-dev.lock
	packaging/check-python.sh $(PYTHON) >/dev/null
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-dev.lock
	$(BIN)/pip install -q --no-deps -e . -e ingest
	touch $@

venv: $(BIN)/edge-agent

# The tests and the demo start their own private Mosquitto; they need the binary.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
		echo "installing mosquitto (apt-get)"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto; fi; }

# tests/cli/test_top.py runs `edge-agent top` in a real pseudo-terminal: tmux.
tmux:
	@command -v tmux >/dev/null 2>&1 || { \
		echo "installing tmux (apt-get)"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq tmux; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq tmux; fi; }

# tests/ingest and the demo start private PostgreSQL clusters (devtools/postgres.py): they need
# the server binaries (initdb, postgres), not a running server.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		echo "installing postgresql-15 (apt-get)"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql-15; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq postgresql-15; fi; }

demo: venv mosquitto postgres
	$(BIN)/python -m devtools.demo

# Two workers (pytest-xdist), a test file each at a time: the process tests mostly wait on
# windows closing, so two at once halve the wall time on 2 cores. `pytest` alone runs serially.
test: venv mosquitto tmux postgres
	$(BIN)/pytest -q -n 2 --dist loadfile

# The deterministic simulation of the durable core, as long as you like:
#   make simulate SEEDS=100000 [FIRST=0] [JOBS=2]; replay one: .venv/bin/python -m devtools.simulation --seed N -v
SEEDS ?= 20000
FIRST ?= 0
JOBS  ?= 2
simulate: venv
	$(BIN)/python -m devtools.simulation --seeds $(SEEDS) --first $(FIRST) --jobs $(JOBS)

check: venv
	$(BIN)/ruff check agent ingest devtools tests bench
	$(BIN)/ruff format --check agent ingest devtools tests bench
	$(BIN)/mypy agent ingest/edge_ingest devtools tests bench

clean:
	rm -rf $(VENV) build dist demo-run .pytest_cache .mypy_cache .ruff_cache .hypothesis

# The locks: requirements.lock (runtime: every install path and the .deb) and
# requirements-dev.lock (the same runtime pins plus the tools CI uses). After editing the
# dependencies in pyproject.toml: `make lock`, review the diff, commit both files.
# `make lock UPGRADE=1` moves every pin to the newest release that pyproject.toml allows.
UV_VERSION := 0.13.9
.PHONY: lock
lock: venv
	$(BIN)/pip install -q 'uv==$(UV_VERSION)'
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade) \
		-c requirements.lock -o requirements-dev.lock
	$(BIN)/uv pip compile ingest/requirements.in --universal --python-version 3.11 \
		--generate-hashes --custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade) \
		-c requirements-dev.lock -o requirements-ingest.lock

# The Debian package, built with the distribution's own interpreter (packaging/build-deb.sh).
DEB_PYTHON ?= /usr/bin/python3
.PHONY: deb
deb:
	PYTHON=$(DEB_PYTHON) packaging/build-deb.sh

.PHONY: install uninstall
install:
	systemd/install.sh

uninstall:
	systemd/install.sh --uninstall

# Benchmarks (bench/): ingest ceiling, replay, footprint; writes bench/RESULTS.md (~12 min).
# A smoke run: $(BIN)/python -m bench.run_all --quick
.PHONY: bench
bench: venv mosquitto
	$(BIN)/python -m bench.run_all

# An hour at 300 cameras x 10 msgs/s with a bare subscriber alongside; writes bench/SOAK.md.
# A smoke run: $(BIN)/python -m bench.soak --minutes 3
.PHONY: soak
soak: venv mosquitto
	$(BIN)/python -m bench.soak --json-out bench/out/soak.json
