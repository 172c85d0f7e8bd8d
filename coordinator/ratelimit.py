"""Limits on failed authentication: sign-ins per client address and per username, bearer-token
lookups per client address.

Failures are counted in the shared cache (Redis), so a limit holds across web processes. A count
runs in a window that its first failure opens; once it holds ``attempts`` failures, sign-ins are
refused without checking the password until the window ends. Bearer tokens are different: a token
is 256 random bits, so guessing one is hopeless and there is nothing to slow down, while refusing
valid ones would let anyone behind a shared address lock every hospital there out. So a token is
always looked up first; one that authenticates is never counted and never refused, and only
unknown or revoked tokens count and get refused (``guard``). Successes are never counted. Keys
carry a hash of the address or username, never the value. ``window_count`` is the counting
itself, which coordinator.throttle also uses for metrics requests.

With Redis unreachable the limits lapse (logged) rather than fail every request: Redis is down
for Celery and the live channels too, and agents must still reach the coordinator over HTTP
to finish their rounds (tests/test_faults.py restarts Redis mid-round).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from django.conf import settings
from django.core.cache import cache
from redis.exceptions import RedisError

T = TypeVar("T")
log = logging.getLogger(__name__)


def _lapses_without_redis(fallback):
    """Without the cache's Redis, answer ``fallback`` (no limit) instead of failing the request."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except (RedisError, OSError) as error:
                log.warning("rate limits are not enforced while Redis is unreachable: %s", error)
                return fallback

        return wrapper

    return decorate


@dataclass(frozen=True)
class Limit:
    what: str  # what failed, as the refusal names it
    key: str
    attempts: int
    seconds: int


class RateLimited(Exception):
    def __init__(self, limit: Limit, retry_after: int):
        super().__init__(f"too many failed {limit.what}, try again in {retry_after} s")
        self.retry_after = retry_after


def _limit(what: str, scope: str, identity: str, attempts: int, seconds: int) -> Limit:
    digest = hashlib.sha256(identity.encode()).hexdigest()[:32]
    return Limit(what, f"ratelimit:{scope}:{digest}", attempts, seconds)


def sign_in_limits(client_address: str, username: str) -> list[Limit]:
    seconds = settings.SIGN_IN_FAILURE_WINDOW_SECONDS
    return [
        _limit("sign-ins", "sign-in-address", client_address, settings.SIGN_IN_FAILURES_PER_IP, seconds),
        _limit(
            "sign-ins",
            "sign-in-username",
            username.casefold(),
            settings.SIGN_IN_FAILURES_PER_USERNAME,
            seconds,
        ),
    ]


def token_limits(client_address: str) -> list[Limit]:
    return [
        _limit(
            "token authentications",
            "token-address",
            client_address,
            settings.TOKEN_FAILURES_PER_IP,
            settings.TOKEN_FAILURE_WINDOW_SECONDS,
        )
    ]


# A window is two keys: ``limit.key`` holds when it ends, and the count lives under a key named
# by that end. A count that outlives its window (an increment racing the expiry) is then never
# read again, instead of counting on forever without an expiry.
def _counter(key: str, end: float) -> str:
    return f"{key}:{end}"


@_lapses_without_redis(None)
def check(limits: Sequence[Limit]) -> None:
    """Raise RateLimited when any of ``limits`` has no failure left in its window."""
    now = time.time()
    ends = cache.get_many([limit.key for limit in limits])
    open_windows = [(limit, ends[limit.key]) for limit in limits if limit.key in ends]
    if not open_windows:
        return
    counts = cache.get_many([_counter(limit.key, end) for limit, end in open_windows])
    for limit, end in open_windows:
        # Redis may keep an ended window's keys a moment longer than ``end``.
        if end > now and counts.get(_counter(limit.key, end), 0) >= limit.attempts:
            raise RateLimited(limit, math.ceil(end - now))


def failure_record(limits: Sequence[Limit]) -> None:
    for limit in limits:
        window_count(limit.key, limit.seconds)


@_lapses_without_redis(0)
def window_count(key: str, seconds: int) -> int:
    """Count one event in ``key``'s window, which the first event opens for ``seconds``; return the
    window's count so far (0 when it ended meanwhile: the next event opens another)."""
    now = time.time()
    cache.add(key, now + seconds, timeout=seconds)
    end = cache.get(key)
    if end is None:
        return 0
    counter = _counter(key, end)
    cache.add(counter, 0, timeout=max(1, math.ceil(end - now)))
    try:
        return cache.incr(counter)
    except ValueError:  # the window ended between add and incr
        return 0


def guard(limits: Sequence[Limit], attempt: Callable[[], T | None]) -> T | None:
    """``attempt()``'s result when it succeeds, whatever other clients failed. A None result
    (a failure) raises RateLimited when a limit is used up, and is counted otherwise."""
    result = attempt()
    if result is None:
        check(limits)
        failure_record(limits)
    return result


def http_client_address(request) -> str:
    """The client's address; behind a proxy, daphne's --proxy-headers puts it in REMOTE_ADDR."""
    return request.META.get("REMOTE_ADDR") or "unknown"


def socket_client_address(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"
