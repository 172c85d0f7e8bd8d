"""Protections that are not access decisions: the Content-Security-Policy every response carries,
and a cache serializer that never unpickles what it reads from Redis."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from django.conf import settings
from django.utils.deprecation import MiddlewareMixin

# plotly.js empties the style attribute of a heatmap's colour bar (d3's setAttribute), which
# style-src 'self' alone reports as a violation. 'unsafe-hashes' with the hash of "" allows that
# empty value and no other style attribute: the templates set widths through the CSSOM instead
# (static/js/page.js). A plotly chart that needs another value shows up in tests/test_browser.py.
ALLOWED_STYLE_ATTRIBUTES = ("",)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        # No inline script and no eval: every page's code is a static file (plotly.js needs no eval).
        "script-src 'self'",
        # plotly.js's own stylesheet is static/css/plotly.css, so it injects no <style> element.
        "style-src 'self'",
        "style-src-attr 'unsafe-hashes' " + " ".join(_sha256(value) for value in ALLOWED_STYLE_ATTRIBUTES),
        # data: for the empty favicon (base.html) and plotly.js's image heatmaps; blob: for its
        # "download plot as a png" button, which draws the chart through a blob: image.
        "img-src 'self' data: blob:",
        # 'self' covers the same host's ws: and wss: (CSP level 3), which the live pages use.
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Every response forbids inline scripts and styles, other origins, framing and plugins."""

    def process_response(self, request, response):
        # With DEBUG on, Django's own 404 and 500 pages (URL lists, tracebacks) style themselves
        # inline; with it off, they are templates/404.html and Django's plain 500 page.
        if settings.DEBUG and response.status_code in (404, 500):
            return response
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response


class JsonCacheSerializer:
    """For django.core.cache's Redis backend, whose default serializer unpickles what it reads:
    whoever can write to Redis could then run code in every web process. Integers stay plain, as
    the default serializer keeps them, so ``incr`` stays atomic."""

    def dumps(self, value: Any) -> int | bytes:
        if type(value) is int:
            return value
        return json.dumps(value).encode()

    def loads(self, data: bytes) -> Any:
        try:
            return int(data)
        except ValueError:
            return json.loads(data)
