"""How fast an agent may send metrics: a token bucket per agent socket, and a count per site in
the shared cache for the HTTP endpoint. Over the limit a message or request is refused and
nothing of it is stored; the socket stays open, and the agent may send again once it slows down.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from django.conf import settings

from coordinator import ratelimit
from coordinator.errors import TooManyRequests


class TokenBucket:
    """``rate`` events a second on average, up to ``burst`` at once after a quiet spell."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if not (rate > 0 and burst >= 1):
            raise ValueError(
                f"a token bucket needs a rate above 0 and a burst of 1 or more, not {rate}, {burst}"
            )
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self) -> bool:
        """Spend one token if there is one; False means the event is over the limit."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def metrics_bucket() -> TokenBucket:
    return TokenBucket(rate=settings.METRICS_MESSAGES_PER_SECOND, burst=settings.METRICS_BURST)


def metrics_refusal(what: str) -> str:
    return (
        f"rate limit: at most {settings.METRICS_MESSAGES_PER_SECOND} metrics {what} a second, "
        f"in bursts of at most {settings.METRICS_BURST}; this one was not stored, send fewer, larger batches"
    )


def metrics_request_check(site_id: int) -> None:
    """Raise TooManyRequests once the site sent more than a burst of requests in its window.

    A site's first request opens a window of burst / rate seconds, so the average stays at the
    rate; the count lives in the shared cache (ratelimit.window_count), so every web process
    sees the same one.
    """
    seconds = max(1, round(settings.METRICS_BURST / settings.METRICS_MESSAGES_PER_SECOND))
    if ratelimit.window_count(f"metrics-requests:{site_id}", seconds) > settings.METRICS_BURST:
        raise TooManyRequests(metrics_refusal("requests"))
