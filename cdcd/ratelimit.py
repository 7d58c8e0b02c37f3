"""Token bucket on bytes written to the target (``bandwidth_limit_mb``)."""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Allow ``rate`` bytes per second on average, bursts of at most ``burst`` bytes;
    ``rate`` None lets everything through (a limit that ``set_rate`` may add later)."""

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self.set_rate(rate, burst)

    def set_rate(self, rate: float | None, burst: float | None = None) -> None:
        """Change the rate now, also for writers already holding this bucket."""
        self.rate = None if rate is None else float(rate)
        self.burst = 0.0 if rate is None else \
            float(burst if burst is not None else max(rate / 10, 64 * 1024))
        self.tokens = self.burst
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent; a request over the burst goes into debt."""
        if self.rate is None:
            return
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)
