"""RangeReaderTests: what every range reader (local, fsspec, obstore, wrapped) must do."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from gpubatch.core.errors import InputError
from gpubatch.io.ranges import RangeReader

DATA = bytes(range(256)) * 4096  # 1 MiB with a recognisable pattern


class RangeReaderTests:
    """Subclass and provide ``make_reader``: a fixture returning ``f(data: bytes) -> RangeReader``
    over an object that holds ``data``; and ``missing_reader``: a reader over an absent object."""

    @pytest.fixture()
    def reader(self, make_reader: Callable[[bytes], RangeReader]) -> RangeReader:
        return make_reader(DATA)

    def test_size(self, reader: RangeReader) -> None:
        assert reader.size() == len(DATA)

    def test_ranges_are_the_bytes_asked_for(self, reader: RangeReader) -> None:
        ranges = [(0, 10), (5, 100), (70_000, 3), (len(DATA) - 7, 7), (123_456, 65_536)]
        got = reader.read_ranges(ranges)
        assert got == [DATA[o : o + n] for o, n in ranges]

    def test_neighbours_coalesce_to_the_same_bytes(self, reader: RangeReader) -> None:
        ranges = [(i * 1000, 900) for i in range(50)]  # gaps of 100 bytes: one request
        assert reader.read_ranges(ranges) == [DATA[o : o + n] for o, n in ranges]
        assert reader.read_ranges(list(reversed(ranges))) == [DATA[o : o + n] for o, n in reversed(ranges)]

    def test_empty_call_and_zero_length(self, reader: RangeReader) -> None:
        assert reader.read_ranges([]) == []
        assert reader.fetch(10, 10) == b""

    def test_concurrent_callers_get_their_own_bytes(self, reader: RangeReader) -> None:
        results: dict[int, list[bytes]] = {}

        def call(t: int) -> None:
            ranges = [((t * 37 + i) * 4099 % (len(DATA) - 5000), 5000) for i in range(20)]
            results[t] = reader.read_ranges(ranges)
            assert results[t] == [DATA[o : o + n] for o, n in ranges]

        threads = [threading.Thread(target=call, args=(t,)) for t in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert len(results) == 6

    def test_read_past_the_end_is_a_truncation_error(self, reader: RangeReader) -> None:
        with pytest.raises(InputError, match="truncated"):
            reader.read_ranges([(len(DATA) - 10, 100)])

    def test_missing_object_is_an_input_error(self, missing_reader: Callable[[], RangeReader]) -> None:
        with pytest.raises(InputError, match="not found"):
            missing_reader().read_ranges([(0, 10)])
