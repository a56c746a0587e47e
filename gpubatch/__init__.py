"""gpubatch: batch deep-learning inference over whole-slide images and genomes.

Reads are overlapped with compute and every stage is timed, so each run says where its time went
(storage, decode, transfer, batching or the model) and what to change.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpubatch.runtime.result import Result
    from gpubatch.spec import JobSpec

__all__ = ["JobSpec", "Result", "__version__", "load_job", "open_results", "run"]


def run(job_or_path: Any, **overrides: Any) -> Result:
    """Run a job (a JobSpec or a YAML path) and return its Result; see gpubatch.runtime.runner.run."""
    from gpubatch.runtime.runner import run as _run

    return _run(job_or_path, **overrides)


def load_job(path: Any, overrides: Any = None) -> JobSpec:
    """Load and validate a job spec file (raises SpecError naming each bad field)."""
    from gpubatch.spec import load_job as _load

    return _load(path, overrides)


def open_results(outdir: Any, storage: Any = None) -> Result:
    """Open a run's outputs (a folder or an object-store URI; ``storage``: its fsspec options):
    the report and predictions, without re-running anything."""
    from gpubatch.runtime.result import open_results as _open

    return _open(str(outdir), storage)


def __getattr__(name: str) -> Any:
    if name == "JobSpec":
        from gpubatch.spec import JobSpec as _JobSpec

        return _JobSpec
    if name == "Result":
        from gpubatch.runtime.result import Result as _Result

        return _Result
    raise AttributeError(name)
