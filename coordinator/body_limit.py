"""Request body size limits, enforced while a body arrives, before Django reads it.

Django's ASGI handler reads a whole request body before any view runs, so a limit in a view
comes too late. Update uploads may be up to ``MAX_UPDATE_BYTES``; every other request up to
``MAX_REQUEST_BYTES``. Over its limit a request is answered 413 with
``{"error": "... the limit is N bytes ..."}`` and nothing of it is stored.

Two places enforce the same limits: ``BodyLimitMiddleware`` in front of the ASGI application
(it never reads past the limit, whichever server runs it), and ``coordinator.serve``, the daphne
that the demo, the tests and production run, which refuses while the bytes come off the socket:
daphne hands a request to the application only once its whole body has arrived.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.urls import Resolver404, resolve

UPDATE_UPLOAD = "api-agent-task-update"


def limit_for(path: str) -> int:
    """The most body bytes a request to ``path`` may carry."""
    try:
        name = resolve(path).url_name
    except Resolver404:
        name = None
    return settings.MAX_UPDATE_BYTES if name == UPDATE_UPLOAD else settings.MAX_REQUEST_BYTES


def refusal_body(limit: int) -> bytes:
    return json.dumps(
        {"error": f"request body too large: the limit is {limit} bytes for this endpoint"}
    ).encode()


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length an ASGI request declares, or None (none, or not a plain number)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


async def _refuse(send, limit: int) -> None:
    body = refusal_body(limit)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send(
        {"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]}
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """ASGI: a declared Content-Length over the limit is refused before the body is read; a body
    without one is counted as it arrives and refused once it passes the limit. The application
    then hears that the client left (``http.disconnect``), so Django drops the request unread."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = limit_for(scope["path"])
        declared = declared_length(scope["headers"])
        if declared is not None and declared > limit:
            return await _refuse(send, limit)
        received = 0
        over = responded = False

        async def counted_receive():
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                over = received > limit
                if over:
                    return {"type": "http.disconnect"}
            return message

        async def noted_send(message):
            nonlocal responded
            responded = responded or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, noted_send)
        if over and not responded:
            await _refuse(send, limit)
