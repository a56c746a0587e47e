"""A command in a pseudo-terminal of its own, as a login shell's foreground command, for tests of
what a run does when its terminal closes (an SSH session that drops)."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import threading
from typing import Any


class Terminal:
    """``python -m gpubatch ARGS`` in a pseudo-terminal of its own, as a login shell's foreground
    command: the terminal is its controlling terminal, so closing it (:meth:`hang_up`, what an
    SSH session that drops does) makes the kernel send it SIGHUP, and its writes there fail."""

    def __init__(self, *args: str, sighup: Any = signal.SIG_DFL, stdout: int | None = None):
        """``sighup``: SIGHUP's disposition in the command (``signal.SIG_IGN``: as ``nohup`` or
        ``disown`` leave it); ``stdout``: where its stdout goes instead (``subprocess.PIPE``)."""
        master, slave = os.openpty()

        def own_the_terminal() -> None:  # after setsid (start_new_session): a session leader
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # as a login shell starts it: a test runner under nohup passed SIGHUP down ignored, and
            # the command outlived the hang-up it was to be stopped by (CI started with nohup)
            signal.signal(signal.SIGHUP, sighup)

        self.proc = subprocess.Popen([sys.executable, "-m", "gpubatch", *args], stdin=slave,
                                     stdout=slave if stdout is None else stdout, stderr=slave,
                                     start_new_session=True, preexec_fn=own_the_terminal,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"})
        os.close(slave)
        self.master, self.shown = master, bytearray()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:  # select with a timeout: a read blocked on the master would keep it open
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    self.shown += os.read(self.master, 65536)
                except OSError:
                    return

    def hang_up(self) -> None:
        """Close the terminal's only master: the kernel hangs the terminal up."""
        self._stop.set()
        self._reader.join()
        os.close(self.master)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
