"""The benchmarks and soaks (not shipped with the agent). Run each from the repository root as a
module, e.g. `.venv/bin/python -m bench.run_all --quick`; see CONTRIBUTING.md, Benchmarks."""
