"""Tests of the forwarder."""
