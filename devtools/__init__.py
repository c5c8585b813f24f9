"""Development tooling, not shipped: the deterministic simulation, processes for tests and
benchmarks, ground truth, the demo."""
