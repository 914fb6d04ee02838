"""Doing something every few seconds on a thread while a block of code runs (the train stage's checkpoint copies and
its MLflow heartbeat)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def every(seconds: float, action: Callable[[], None], name: str, first: bool = False, last: bool = False) -> Iterator[None]:
    """Call `action` every `seconds` on a thread of its own while the block runs; also once as it starts (`first`, on
    that thread) and once after it ends, however it ends (`last`, in the caller's thread, after the thread stopped:
    never two calls at once)."""
    stop = threading.Event()

    def loop() -> None:
        if first:
            action()
        while not stop.wait(seconds):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if last:
            action()
