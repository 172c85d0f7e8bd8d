"""Websocket routes. Browser sockets use the session cookie, so their Origin is checked;
agent sockets carry a site token instead of a cookie and need no Origin check."""

from channels.auth import AuthMiddlewareStack
from channels.security.websocket import AllowedHostsOriginValidator
from django.urls import path

from coordinator import consumers


def _browser(consumer):
    return AllowedHostsOriginValidator(AuthMiddlewareStack(consumer.as_asgi()))


websocket_urlpatterns = [
    path("ws/federations/<int:federation_id>/", _browser(consumers.FederationConsumer)),
    path("ws/rounds/<int:round_id>/", _browser(consumers.RoundConsumer)),
    path("ws/agent/", consumers.AgentConsumer.as_asgi()),
]
