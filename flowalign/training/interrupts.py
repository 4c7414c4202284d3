"""Ctrl-C at iteration boundaries: the first SIGINT asks the loop to stop once the running iteration is done (so a
checkpoint only ever holds a whole iteration); a second one stops at once and the unfinished iteration is
discarded (the last checkpoint stays as it was)."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequest:
    """Set by the first SIGINT; read by the loop between iterations."""

    def __init__(self) -> None:
        self.requested = False


@contextlib.contextmanager
def stop_at_boundaries(announce) -> Iterator[StopRequest]:
    """Within the block, SIGINT sets ``requested`` (and calls ``announce()``); a second SIGINT raises
    KeyboardInterrupt. Only the main thread can hold signal handlers: elsewhere the block changes nothing."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        announce()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)
