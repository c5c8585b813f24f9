"""Tests of the operating surface."""
