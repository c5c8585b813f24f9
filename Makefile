# edge-agent: `make demo` sets everything up and runs the demo; `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test check venv mosquitto clean simulate

$(BIN)/edge-agent: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: $(BIN)/edge-agent

# The tests and the demo start their own private Mosquitto; they need the binary.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || { \
		echo "installing mosquitto (apt-get)"; \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq mosquitto; fi; }

demo: venv mosquitto
	$(BIN)/python -m agent.demo

test: venv mosquitto
	$(BIN)/pytest -q

# The deterministic simulation of the durable core, as long as you like:
#   make simulate SEEDS=100000 [FIRST=0] [JOBS=2]; replay one: .venv/bin/python -m agent.sim.durable --seed N -v
SEEDS ?= 20000
FIRST ?= 0
JOBS  ?= 2
simulate: venv
	$(BIN)/python -m agent.sim.durable --seeds $(SEEDS) --first $(FIRST) --jobs $(JOBS)

check: venv
	$(BIN)/ruff check agent tests
	$(BIN)/ruff format --check agent tests
	$(BIN)/mypy agent tests

clean:
	rm -rf $(VENV) demo-run .pytest_cache .mypy_cache .ruff_cache .hypothesis

.PHONY: install uninstall
install:
	systemd/install.sh

uninstall:
	systemd/install.sh --uninstall

# Benchmarks (bench/): ingest ceiling, replay, footprint; writes bench/RESULTS.md (~12 min).
# A smoke run: $(BIN)/python bench/run_all.py --quick
.PHONY: bench
bench: venv mosquitto
	$(BIN)/python bench/run_all.py

# An hour at 300 cameras x 10 msgs/s with a bare subscriber alongside; writes bench/SOAK.md.
# A smoke run: $(BIN)/python bench/soak.py --minutes 3
.PHONY: soak
soak: venv mosquitto
	$(BIN)/python bench/soak.py --json-out bench/out/soak.json
