"""predictions.parquet and predictions.zarr keep one schema whatever a run found: downstream
code reads many runs' outputs together (``pd.concat``, ``pyarrow.dataset`` over a folder of
runs, polars' strict concat), and a schema that follows the content breaks it.

Real runs of one classifier over a slide with tissue, one without (blank glass: zero tiles) and
one that is no slide (quarantined): an empty run, a run whose first committed shard is empty,
a run with a failed input, a resumed run whose parts come from two runs, and a run where nothing
committed. Before, an empty run's predictions.parquet held the index columns alone with ``level``
int64 (every part has int32): ``pyarrow.dataset`` over an empty run's file and a full one took
the first file's schema, dropped the ``probs_*`` columns and made ``level`` int64, and
``pd.concat`` turned ``level`` int64.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import slide_job, write_job

import gpubatch
from gpubatch.cli.demo import write_synthetic_slide
from gpubatch.core.errors import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("schema-inputs")
    bad = folder / "bad.tif"
    bad.write_bytes(b"II*\0" + b"not a tiff" * 10)
    return {"good": write_synthetic_slide(folder / "good.tif", 1024, 768, seed=1),
            "blank": write_synthetic_slide(folder / "blank.tif", 512, 512, levels=1,
                                           image=np.full((512, 512, 3), 240, np.uint8)),
            "bad": bad}


def _run(tmp_path: Path, name: str, uris: list[Path], classifier: Path, **kw: Any) -> Any:
    job = slide_job([str(u) for u in uris], classifier, tmp_path / name, output={"formats": ["parquet", "zarr"]},
                    tiles={"tissue": {"method": "otsu", "min_fraction": 0.5}})
    return gpubatch.run(write_job(tmp_path / f"{name}.yaml", job), show_progress=False, **kw)


def _schema(out: Path) -> pa.Schema:
    return pq.read_schema(out / "predictions.parquet")


def _zarr_arrays(out: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...]]]]:
    """Each committed group's arrays: dtype and trailing shape, by the root's ``groups``."""
    import zarr

    root = zarr.open_group(str(out / "predictions.zarr"), mode="r")
    shards, groups = root.attrs["shards"], root.attrs["groups"]
    assert list(groups) == shards
    return {key: {name: (str(a.dtype), a.shape[1:]) for name, a in root[groups[key]].arrays()} for key in shards}


def test_every_run_has_the_schema_of_a_run_with_rows(tmp_path: Path, inputs: dict[str, Path],
                                                    classifier: Path) -> None:
    good, blank, bad = inputs["good"], inputs["blank"], inputs["bad"]
    full = _run(tmp_path, "full", [good], classifier)
    assert full.exit_code == EXIT_OK and full.report["items"] > 0
    reference = _schema(tmp_path / "full")
    assert reference.names == ["slide", "x", "y", "level", "probs_0", "probs_1", "probs_2"]
    runs = {"empty": [blank], "empty-first": [blank, good], "failed": [good, bad]}
    codes = {name: _run(tmp_path, name, uris, classifier).exit_code for name, uris in runs.items()}
    assert codes == {"empty": EXIT_OK, "empty-first": EXIT_OK, "failed": EXIT_PARTIAL}
    # a slide quarantined by one run reads in the next: --resume computes it beside the kept part
    flaky = tmp_path / "flaky.tif"
    shutil.copy(bad, flaky)
    assert _run(tmp_path, "resumed", [good, flaky], classifier).exit_code == EXIT_PARTIAL
    shutil.copy(good, flaky)
    again = _run(tmp_path, "resumed", [good, flaky], classifier, resume=True)
    assert again.exit_code == EXIT_OK and again.report["resumed"]["shards"] == 1
    for name in [*runs, "resumed"]:
        assert _schema(tmp_path / name).equals(reference, check_metadata=True), name
    arrays = {name: _zarr_arrays(tmp_path / name) for name in ["full", *runs, "resumed"]}
    widths = next(iter(arrays["full"].values()))
    assert widths["level"] == ("int32", ()) and widths["probs"] == ("float32", (3,))
    for name, groups in arrays.items():
        assert all(group == widths for group in groups.values()), (name, groups)


def test_a_run_where_nothing_committed_keeps_the_index_types_and_a_zarr_root(
        tmp_path: Path, inputs: dict[str, Path], classifier: Path) -> None:
    """Every input quarantined (exit 1): no part says what the model's columns are, so
    predictions.parquet has the index columns alone, typed as a run with rows types them; and
    predictions.zarr's root says that no slide was committed. Before, a first run had no
    predictions.zarr at all (the documented ``zarr.open_group(...).attrs["shards"]`` failed), and
    a --resume over other inputs left the run before's ``shards`` and ``groups`` in the root,
    naming slides predictions.parquet no longer held."""
    import zarr

    assert _run(tmp_path, "none", [inputs["bad"]], classifier).exit_code == EXIT_ERROR
    assert _run(tmp_path, "stale", [inputs["good"]], classifier).exit_code == EXIT_OK
    assert _run(tmp_path, "stale", [inputs["bad"]], classifier, resume=True).exit_code == EXIT_ERROR
    for name in ("none", "stale"):
        schema = _schema(tmp_path / name)
        assert schema.names == ["slide", "x", "y", "level"]
        assert [f.type for f in schema] == [pa.string(), pa.int64(), pa.int64(), pa.int32()]
        root = zarr.open_group(str(tmp_path / name / "predictions.zarr"), mode="r")
        assert root.attrs["shards"] == [] and root.attrs["groups"] == {}, name
