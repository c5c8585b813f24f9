"""Tests of whole agents, brokers, receivers and packages as real processes, and the simulation."""
