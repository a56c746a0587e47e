"""Conformance suites: one per interface, subclassed by the tests of every implementation."""
