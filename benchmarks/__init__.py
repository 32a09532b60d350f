"""Benchmarks: long runs that print JSON and a table; never part of the test suite."""
