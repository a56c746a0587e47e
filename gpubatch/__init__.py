"""gpubatch: batch deep-learning inference over whole-slide images and genomes.

Reads are overlapped with compute and every stage is timed, so each run says where its time went
(storage, decode, transfer, batching or the model) and what to change.

``import gpubatch`` stays light (the facade imports its modules when first used): a script or a
notebook pays for pandas, Dask and ONNX Runtime only when it runs or reads something.
"""

from __future__ import annotations

__version__ = "0.1.0"

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpubatch.core.errors import (
        DiskFull,
        GpubatchError,
        InputError,
        MissingExtraError,
        NotAnOutputError,
        OutputRefused,
        OutputsNotWrittenError,
        SpecError,
        UnfinishedOutputError,
        ValidationGateError,
    )
    from gpubatch.runtime.result import Result
    from gpubatch.spec import JobSpec

__all__ = [
    "DiskFull", "GpubatchError", "InputError", "JobSpec", "MissingExtraError", "NotAnOutputError",
    "OutputRefused", "OutputsNotWrittenError", "Result", "SpecError", "UnfinishedOutputError",
    "ValidationGateError", "__version__", "load_job", "open_results", "run",
]

#: the errors a script may catch, all subclasses of GpubatchError (gpubatch.core.errors)
_ERRORS = {"DiskFull", "GpubatchError", "InputError", "MissingExtraError", "NotAnOutputError", "OutputRefused",
           "OutputsNotWrittenError", "SpecError", "UnfinishedOutputError", "ValidationGateError"}


def run(job_or_path: JobSpec | str | os.PathLike[str], **overrides: Any) -> Result:
    """Run a job (a JobSpec or a YAML path) and return its Result; see gpubatch.runtime.runner.run."""
    from gpubatch.runtime.runner import run as _run
    from gpubatch.spec import JobSpec as _JobSpec

    return _run(job_or_path if isinstance(job_or_path, _JobSpec) else os.fspath(job_or_path), **overrides)


def load_job(path: str | os.PathLike[str], overrides: dict[str, Any] | list[str] | None = None) -> JobSpec:
    """Load and validate a job spec file (raises SpecError naming each bad field). ``overrides``:
    ``{"tiles.size": 256}`` (or ``tiles__size``), or ``--set`` strings ``["tiles.size=256"]``."""
    from gpubatch.spec import load_job as _load

    return _load(os.fspath(path), overrides)



def open_results(outdir: str | os.PathLike[str], storage: dict[str, Any] | None = None) -> Result:
    """Open a run's outputs (a folder or an object-store URI; ``storage``: its fsspec options):
    the report and predictions, without re-running anything."""
    from gpubatch.runtime.result import open_results as _open

    return _open(os.fspath(outdir), storage)


def __getattr__(name: str) -> Any:
    if name == "JobSpec":
        from gpubatch.spec import JobSpec as _JobSpec

        return _JobSpec
    if name == "Result":
        from gpubatch.runtime.result import Result as _Result

        return _Result
    if name in _ERRORS:
        from gpubatch.core import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'gpubatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
