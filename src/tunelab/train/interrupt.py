"""Stopping a run on request: SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption notice).

The first signal asks the loop to finish the step it is in, write a checkpoint at that step and
stop (`--resume` then continues exactly); a second one stops at once.
"""

from __future__ import annotations

import signal
import threading

from tunelab.console import console


class StopRequests:
    """While in this block, SIGINT and SIGTERM set `signum` instead of stopping the process (a
    second one raises KeyboardInterrupt). Signal handlers belong to the main thread: elsewhere
    (a run inside a server or a thread pool) the process's own handling stays as it is."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._request) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _request(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        console.print(f"[yellow]{signal.Signals(signum).name}:[/] stopping after this step with a checkpoint (send it again to stop at once)")
