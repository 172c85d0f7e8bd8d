"""Websocket consumers: they authenticate, join the groups their user may see, and forward events.

Browsers (session cookie, origin checked): a federation's page joins ``federation-<id>`` for
coordinators and auditors; a round page joins ``round-<id>``. A site admin joins only the
``site-<id>`` groups of their own sites, so their socket never carries another site's data.
Agents (site token in the Authorization header): join their site's group to hear of new tasks,
and send live metrics, which are stored and forwarded like the HTTP ones. Refusals close with
4403 (no access), 4401 (no valid token), or 4429 (too many failed tokens from this address).
An agent socket whose token is revoked or rotated closes with 4401 as soon as the change commits
(its ``agent-<site id>`` group is told), and checks its token again before it stores anything,
so a message racing the close is refused too; reconnecting with that token is refused with 4401.
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.http import Http404

from coordinator import access, events, ratelimit, services, throttle
from coordinator.errors import ServiceError
from coordinator.models import Site, Task, token_hash

NO_ACCESS = 4403
NO_VALID_TOKEN = 4401
TOO_MANY_FAILURES = 4429


class _ForwardingConsumer(AsyncJsonWebsocketConsumer):
    groups_joined: list[str]
    only_round: int | None = None

    async def join(self, groups: list[str]) -> None:
        self.groups_joined = groups
        for group in groups:
            await self.channel_layer.group_add(group, self.channel_name)

    async def disconnect(self, code):
        for group in getattr(self, "groups_joined", []):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def event_forward(self, message):
        event = message["event"]
        # A site admin's round page listens on its site group, which carries all that site's rounds.
        if self.only_round is not None and event.get("round") not in (None, self.only_round):
            return
        await self.send_json(event)


@database_sync_to_async
def _federation_groups(user, federation_id: int) -> list[str] | None:
    try:
        federation = access.federation_for(user, federation_id)
    except Http404:
        return None
    site_ids = access.site_ids_visible_in(user, federation)
    if site_ids is None:
        return [events.federation_group(federation_id)]
    return [events.site_group(site_id) for site_id in sorted(site_ids)]


@database_sync_to_async
def _round_groups(user, round_id: int) -> list[str] | None:
    try:
        round_ = access.round_for(user, round_id)
    except Http404:
        return None
    site_ids = access.site_ids_visible_in(user, round_.federation)
    if site_ids is None:
        return [events.round_group(round_id)]
    return [events.site_group(site_id) for site_id in sorted(site_ids)]


class FederationConsumer(_ForwardingConsumer):
    async def connect(self):
        groups = await _federation_groups(
            self.scope.get("user"), self.scope["url_route"]["kwargs"]["federation_id"]
        )
        if groups is None:
            await self.close(code=NO_ACCESS)
            return
        await self.join(groups)
        await self.accept()


class RoundConsumer(_ForwardingConsumer):
    async def connect(self):
        round_id = self.scope["url_route"]["kwargs"]["round_id"]
        groups = await _round_groups(self.scope.get("user"), round_id)
        if groups is None:
            await self.close(code=NO_ACCESS)
            return
        if not groups[0].startswith("round-"):
            self.only_round = round_id
        await self.join(groups)
        await self.accept()


def _bearer_token(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme == "Bearer" else None
    return None


@database_sync_to_async
def _agent_site(token: str | None, scope) -> Site | None:
    """The site whose token the socket carries. An unknown token raises RateLimited once its
    address failed too often; a valid one is never refused (coordinator.ratelimit)."""
    if not token:
        return None
    limits = ratelimit.token_limits(ratelimit.socket_client_address(scope))
    return ratelimit.guard(limits, lambda: services.site_authenticate(token))


@database_sync_to_async
def _token_still_valid(site_id: int, digest: str) -> bool:
    return Site.objects.filter(pk=site_id, token_hash=digest, revoked_at__isnull=True).exists()


@database_sync_to_async
def _owned_task(site, task_id: int) -> Task:
    try:
        return access.task_for_site(site, task_id)
    except Http404:
        raise ServiceError(f"this site has no task {task_id}") from None


class AgentConsumer(_ForwardingConsumer):
    """An agent's live channel: metrics in, task notifications out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # One bucket per socket: an agent's flood costs that agent's messages, nobody else's.
        self.metrics_bucket = throttle.metrics_bucket()

    async def connect(self):
        token = _bearer_token(self.scope)
        try:
            self.site = await _agent_site(token, self.scope)
        except ratelimit.RateLimited:
            await self.close(code=TOO_MANY_FAILURES)
            return
        if self.site is None or token is None:
            await self.close(code=NO_VALID_TOKEN)
            return
        self.token_digest = token_hash(token)
        self.tasks: dict[int, Task] = {}
        await self.join([events.site_group(self.site.pk), events.agent_group(self.site.pk)])
        await self.accept()
        await database_sync_to_async(services.site_heartbeat)(site=self.site)

    async def token_changed(self, message):
        """The site's token was revoked or rotated: close unless this socket's token still works."""
        if not await _token_still_valid(self.site.pk, self.token_digest):
            await self.close(code=NO_VALID_TOKEN)

    async def event_forward(self, message):
        # An agent needs only to hear that work is waiting; it fetches the rest over HTTP.
        if message["event"].get("type") == "task.assigned":
            await self.send_json(message["event"])

    async def receive(self, text_data=None, bytes_data=None, **kwargs):
        """Every frame spends a token; one that is no JSON object is answered, and the socket stays open."""
        allowed = self.metrics_bucket.take()
        if text_data is None:
            await self.send_json(
                {"type": "error", "error": "binary frames are not understood: send JSON text"}
            )
            return
        try:
            content = await self.decode_json(text_data)
        except (ValueError, RecursionError):
            await self.send_json({"type": "error", "error": "the message is not JSON"})
            return
        if not isinstance(content, dict):
            kind = type(content).__name__
            await self.send_json({"type": "error", "error": f"a message must be a JSON object, not {kind}"})
            return
        if not allowed:
            refusal = throttle.metrics_refusal("messages")
            await self.send_json({"type": "error", "error": refusal, "seq": content.get("seq")})
            return
        await self.receive_json(content, **kwargs)

    async def receive_json(self, content, **kwargs):
        if content.get("type") != "metrics":
            await self.send_json({"type": "error", "error": f"unknown message type {content.get('type')!r}"})
            return
        if not await _token_still_valid(self.site.pk, self.token_digest):
            await self.close(code=NO_VALID_TOKEN)
            return
        try:
            task = await self._task(int(content.get("task", 0)))
            points = content.get("points", [])
            stored = await database_sync_to_async(services.metrics_record)(task=task, points=points)
        except (ServiceError, TypeError, ValueError) as error:
            await self.send_json({"type": "error", "error": str(error), "seq": content.get("seq")})
            return
        await self.send_json({"type": "ack", "stored": stored, "seq": content.get("seq")})

    async def _task(self, task_id: int) -> Task:
        """The task, checked to be this site's once per socket rather than once per message."""
        if task_id not in self.tasks:
            self.tasks[task_id] = await _owned_task(self.site, task_id)
        return self.tasks[task_id]

    @classmethod
    async def decode_json(cls, text_data):
        return json.loads(text_data)
