"""Runs at once in one process (a notebook's threads, its cells run again): what each run's
report says is what that run did, and a Ctrl-C meant for one run stops that one only."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import slide_job, write_job


def test_a_ctrl_c_stops_the_main_thread_s_run_not_another_thread_s(
        tmp_path: Path, slides_dir: Path, mean_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook's interrupt while a cell's run went on in a thread beside the main thread's:
    the signal was latched process-wide and the thread's run, asking at its next poll, raised
    KeyboardInterrupt too (the README says a run in another thread goes on to its end). Now
    the main thread's run stops, resumable, and the other finishes every slide."""
    import os
    import signal

    import gpubatch
    from gpubatch.runtime import stopping
    from gpubatch.runtime.progress import Progress

    slides = [str(p) for p in sorted(slides_dir.glob("*.tif"))]
    main_job = write_job(tmp_path / "main.yaml", slide_job(slides, mean_model, tmp_path / "main"))
    side_job = write_job(tmp_path / "side.yaml", slide_job(slides, mean_model, tmp_path / "side"))
    update, side_outcome, side_done = Progress.update, [], threading.Event()

    def side_run() -> None:
        try:
            side_outcome.append(gpubatch.run(side_job, show_progress=False).exit_code)
        except BaseException as exc:  # noqa: BLE001 - what the thread's run raised is the finding
            side_outcome.append(type(exc).__name__)
        finally:
            side_done.set()

    side = threading.Thread(target=side_run, name="side")

    def update_in_turn(self: Progress, result: Any) -> None:
        update(self, result)
        if threading.current_thread() is threading.main_thread() and not side.is_alive() and not side_outcome:
            side.start()
            try:
                side_done.wait(120)
            except KeyboardInterrupt:  # the main run stops only once the side run has ended
                side_done.wait(120)
                raise
        elif threading.current_thread() is side and not stopping._received:
            os.kill(os.getpid(), signal.SIGINT)
            deadline = threading.Event()
            while not stopping._received and not deadline.wait(0.01):
                pass

    monkeypatch.setattr(Progress, "update", update_in_turn)
    with pytest.raises(KeyboardInterrupt):
        gpubatch.run(main_job, show_progress=False)
    assert side_outcome == [0]
    assert gpubatch.open_results(tmp_path / "side").predictions()["slide"].nunique() == 3
    assert gpubatch.run(main_job, show_progress=False, resume=True).complete
