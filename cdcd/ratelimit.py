"""Token bucket on bytes written to the target (``bandwidth_limit_mb``)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Allow ``rate`` bytes per second on average, bursts of at most ``burst`` bytes."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate / 10, 64 * 1024))
        self.tokens = self.burst
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent; a request over the burst goes into debt."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)
