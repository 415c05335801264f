"""Polling a real system (portal, agents) until a condition holds.

Shared by the end-to-end tests and the benchmarks in bench/, which drive the same
processes and wait for the same things (hosts online, jobs finished).
"""
import time


def wait_for(check, what: str, timeout: float = 60, interval: float = 0.05):
    """``check()``'s first truthy result, polled every ``interval`` seconds.

    Raises ``TimeoutError`` naming ``what`` once ``timeout`` seconds have passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")
