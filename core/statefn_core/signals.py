"""Waiting for the end of a long-running process (SIGTERM from Kubernetes, Ctrl-C locally)."""

from __future__ import annotations

import asyncio
import signal

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def until_stopped() -> None:
    """Return when SIGTERM or SIGINT arrives, so the caller can shut down cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in _STOP_SIGNALS:
            loop.remove_signal_handler(sig)
