"""Conformance suites, one per interface, reused by the tests of every implementation.

As ``zarr.testing.StoreTests`` and fsspec's abstract tests are: a test module subclasses a suite
and provides its fixtures, and the suite's tests then run against that implementation. A new
backend, source or writer passes the same suite as the ones already there, or says why not.

- :class:`~gpubatch.testing.ranges.RangeReaderTests`: fixture ``make_reader(data) -> RangeReader``
- :class:`~gpubatch.testing.backends.SlideBackendTests`: fixtures ``backend``, ``reference``,
  ``truncated_backend``
- :class:`~gpubatch.testing.sources.SourceTests`: fixtures ``job``, ``bad_job``
- :class:`~gpubatch.testing.models.ModelBackendTests`: fixtures ``model``, ``item_shape``
- :class:`~gpubatch.testing.writers.ShardWriterTests`: fixture ``outdir``, attribute ``formats``

The suites import pytest, which the package does not depend on: import them from tests only.
"""
