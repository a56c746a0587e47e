"""The Python API as an analysis script uses it: gpubatch.run, open_results and the Result,
on real small runs (inline profile unless the test is about worker processes)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from conftest import slide_job, write_job

if TYPE_CHECKING:
    from s3_fixtures import S3Stack

pytest_plugins = ["s3_fixtures"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, slides_dir: Path, classifier: Path) -> Path:
    """A finished run of the classifier over the three test slides; its output folder."""
    import gpubatch

    tmp = tmp_path_factory.mktemp("api")
    job = slide_job([str(slides_dir / "*.tif")], classifier, tmp / "out")
    assert gpubatch.run(write_job(tmp / "job.yaml", job), show_progress=False).exit_code == 0
    return tmp / "out"


@pytest.mark.parametrize("where", ["missing", "folder", "file"])
def test_open_results_refuses_what_no_run_wrote(tmp_path: Path, where: str) -> None:
    """A missing folder, a folder of something else or a file gave a Result with exit code 0 and
    an empty report (a typo read as a finished run), and a 404 only at predictions()."""
    import gpubatch
    from gpubatch.core.errors import NotAnOutputError

    path = tmp_path / "nothing"
    if where == "folder":
        path.mkdir()
        (path / "predictions.parquet").write_bytes(b"")
    elif where == "file":
        path.write_text("x")
    with pytest.raises(NotAnOutputError, match="nothing"):
        gpubatch.open_results(str(path))


def test_open_results_refuses_an_object_store_prefix_no_run_wrote(s3: S3Stack) -> None:
    import gpubatch
    from gpubatch.core.errors import NotAnOutputError

    s3.upload_bytes(b"x", "not-an-output/predictions.parquet")
    for uri in (s3.uri("not-an-output"), s3.uri("no-such-prefix")):
        with pytest.raises(NotAnOutputError, match="s3://"):
            gpubatch.open_results(uri, s3.options())
