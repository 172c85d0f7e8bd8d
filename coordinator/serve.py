"""daphne, refusing a request body over its limit while it arrives.

daphne (through Twisted) reads a request's whole body, spooled to a temporary file, before it
hands the request to the application, so the application's own limit comes only after a huge
upload has been received in full. This server checks as the request comes off the socket: a
Content-Length over the limit is answered 413 before any of the body is read, and a chunked body
is answered 413 the moment it passes the limit; the connection is then closed, and the rest of
the body is never read. The limits are ``coordinator.body_limit``'s.

Takes daphne's arguments: ``python -m coordinator.serve -b 127.0.0.1 -p 8000
coordinator.asgi:application``.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote

import daphne.server  # isort: skip  (first: it installs the asyncio reactor Twisted must use)
from daphne.cli import CommandLineInterface
from daphne.http_protocol import HTTPFactory, WebRequest

from coordinator import body_limit

log = logging.getLogger(__name__)


class LimitedRequest(WebRequest):
    limit = 0
    received = 0
    refused = False

    def gotLength(self, length):
        """Twisted calls this once the headers are in, before any of the body."""
        super().gotLength(length)
        # The request line is all Twisted has parsed so far; self.path comes with the body.
        target = self.channel._path.split(b"?", 1)[0]
        self.limit = body_limit.limit_for(unquote(target.decode("latin-1")))
        if length is not None and length > self.limit:
            self._refuse()

    def handleContentChunk(self, data):
        if self.refused:
            return
        self.received += len(data)
        if self.received > self.limit:
            self._refuse()
            return
        super().handleContentChunk(data)

    def process(self):
        # A refused request whose last chunk was already in the socket buffer never runs.
        if not self.refused:
            return super().process()

    def _refuse(self) -> None:
        self.refused = True
        # Twisted answers "Expect: 100-continue" after gotLength; the 413 is the answer instead.
        self.requestHeaders.removeHeader(b"expect")
        body = body_limit.refusal_body(self.limit)
        self.channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body)
        )
        self.channel.loseConnection()
        log.warning("refused a request body over %d bytes for %r", self.limit, self.channel._path[:200])


class LimitedHTTPFactory(HTTPFactory):
    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        protocol.requestFactory = LimitedRequest
        return protocol


class Server(daphne.server.Server):
    # daphne's run() makes its own HTTPFactory and keeps it here; this puts ours in its place.
    @property
    def http_factory(self) -> HTTPFactory:
        return self._limited_http_factory

    @http_factory.setter
    def http_factory(self, daphnes: HTTPFactory) -> None:
        self._limited_http_factory = LimitedHTTPFactory(self)


class LimitedCommandLineInterface(CommandLineInterface):
    server_class = Server


if __name__ == "__main__":
    LimitedCommandLineInterface.entrypoint()
