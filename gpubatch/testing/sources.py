"""SourceTests: what every Source (slides, genome windows, variants) and its readers must do."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from gpubatch.core.clocks import StageClocks
from gpubatch.core.errors import InputError, SpecError
from gpubatch.sources import ItemBlock, Shard, Source, get_source
from gpubatch.spec import JobSpec


def _blocks(source: Source, shard: Shard, job: JobSpec, threads: int = 1) -> list[ItemBlock]:
    with source.open(shard, job, StageClocks()) as reader:
        units = list(reader.read_units())
        if threads == 1:
            return [unit() for unit in units]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda unit: unit(), units))


class SourceTests:
    """Subclass and provide fixtures: ``job`` (a valid JobSpec of the source's kind, small) and
    ``bad_job`` (the same job whose inputs cannot be read: a corrupt file, an absent contig)."""

    @pytest.fixture()
    def source(self, job: JobSpec) -> Source:
        return get_source(job.kind)

    @pytest.fixture()
    def shards(self, source: Source, job: JobSpec) -> list[Shard]:
        shards, failed = source.plan(job)
        assert len(shards) and not failed
        return list(shards)

    def test_plan_is_picklable_with_unique_ids(self, shards: list[Shard]) -> None:
        assert pickle.loads(pickle.dumps(shards)) == shards
        assert len({s.shard_id for s in shards}) == len(shards)

    def test_blocks_add_up_and_items_are_uint8(self, source: Source, job: JobSpec, shards: list[Shard]) -> None:
        for shard in shards[:3]:
            with source.open(shard, job, StageClocks()) as reader:
                blocks = [unit() for unit in reader.read_units()]
                assert sum(len(b) for b in blocks) == reader.n_items
            for block in blocks:
                assert block.items.dtype == np.uint8
                assert all(len(col) == len(block) for col in block.index.values())

    def test_index_columns_match_the_schema(self, source: Source, job: JobSpec, shards: list[Shard]) -> None:
        blocks = [b for b in _blocks(source, shards[0], job) if len(b)]
        assert blocks, "the first shard yields no items: choose a job whose first shard has some"
        columns = list(source.constant_columns(shards[0])) + list(blocks[0].index)
        assert columns == source.index_schema(job)

    def test_index_columns_have_the_types_of_an_empty_run(self, source: Source, job: JobSpec,
                                                         shards: list[Shard]) -> None:
        """A shard's rows, made Arrow as the writer makes them, have the index types a run with no
        rows writes (merge.empty_index_table): slides' ``level`` was int32 in every part and
        int64 in an empty run's predictions.parquet."""
        from gpubatch.outputs.merge import empty_index_table
        from gpubatch.outputs.writer import rows_table

        block = next(b for b in _blocks(source, shards[0], job) if len(b))
        written = rows_table(source.constant_columns(shards[0]), block.index, {}).schema
        declared = empty_index_table(source.index_schema(job)).schema
        assert written == declared, f"rows written:\n{written}\nan empty run:\n{declared}"

    def test_preprocessing_gives_the_declared_model_input(self, source: Source, job: JobSpec,
                                                          shards: list[Shard]) -> None:
        blocks = [b for b in _blocks(source, shards[0], job) if len(b)]
        items = np.concatenate([b.items for b in blocks])[:4]
        with source.open(shards[0], job, StageClocks()) as reader:
            x = reader.preprocess.on_host(items)
        shape, dtype = source.model_input(job, len(items))
        assert x.shape == shape and x.dtype == np.dtype(dtype)

    @pytest.mark.gpu  # selected by `pytest -m gpu`, the GPU machine's run
    def test_gpu_preprocessing_equals_host(self, source: Source, job: JobSpec, shards: list[Shard]) -> None:
        cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'gpubatch[gpu]')")
        from gpubatch.ops.kernels_gpu import gpu_available

        if not gpu_available():
            pytest.skip("CuPy is installed but no CUDA device is visible")
        items = np.concatenate([b.items for b in _blocks(source, shards[0], job)])[:8]
        with source.open(shards[0], job, StageClocks()) as reader:
            host = reader.preprocess.on_host(items)
            device = cupy.asnumpy(reader.preprocess.on_device(cupy.asarray(items)))
        np.testing.assert_allclose(device, host, rtol=1e-6, atol=1e-6)

    def test_concurrent_read_units_equal_serial(self, source: Source, job: JobSpec, shards: list[Shard]) -> None:
        serial = _blocks(source, shards[0], job)
        concurrent = _blocks(source, shards[0], job, threads=4)
        assert len(serial) == len(concurrent)
        for a, b in zip(serial, concurrent, strict=True):
            np.testing.assert_array_equal(a.items, b.items)
            for name in a.index:
                np.testing.assert_array_equal(a.index[name], b.index[name])

    def test_bad_input_is_an_input_error(self, bad_job: JobSpec) -> None:
        source = get_source(bad_job.kind)
        try:
            shards, failed = source.plan(bad_job)
        except SpecError:
            return  # refused before anything runs: also a clear, per-field error
        if failed:
            return  # quarantined at plan time, with its error
        with pytest.raises(InputError):
            for shard in shards:
                _blocks(source, shard, bad_job)
