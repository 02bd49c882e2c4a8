"""Waiting for a server on loopback to answer: the one poll loop the load runner, benchmarks and tests share."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx


def wait_until_ok(url: str, timeout_s: float, alive: Callable[[], bool] | None = None, poll_s: float = 0.2) -> None:
    """Return once GET `url` answers 200; RuntimeError if `alive()` turns False first, TimeoutError after `timeout_s`.

    `alive` tells whether the server's process still runs, so a server that died is reported at once instead of
    after the whole timeout.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server behind {url} exited before it answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{url} did not answer 200 within {timeout_s:g} s")
