"""API authentication: ``Authorization: Bearer <token>`` for site agents and for people.

Site tokens start with ``site_`` and authenticate as a SiteAgent principal (never as a user);
personal tokens start with ``user_`` and authenticate as their user. Both are looked up by
their SHA-256 hash: the token itself is never stored or logged. A client address that keeps
presenting unknown tokens gets 429 for them for a while; a valid token is never refused for
what other clients sent (coordinator.ratelimit).
"""

from __future__ import annotations

from dataclasses import dataclass

from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions

from coordinator import ratelimit, services
from coordinator.models import PersonalToken, Site, token_hash
from sitesagent import protocol


@dataclass
class SiteAgent:
    """The principal of a request made with a site token."""

    site: Site
    is_authenticated: bool = True
    is_site_agent: bool = True
    is_superuser: bool = False
    is_staff: bool = False
    pk: None = None


class TooManyFailures(exceptions.APIException):
    status_code = 429

    def __init__(self, refusal: ratelimit.RateLimited):
        super().__init__(str(refusal))
        self.wait = refusal.retry_after  # DRF sends it as Retry-After


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme != self.keyword:
            return None
        token = token.strip()
        if not token:
            raise exceptions.AuthenticationFailed("the Bearer header carries no token")
        limits = ratelimit.token_limits(ratelimit.http_client_address(request))
        try:
            principal = ratelimit.guard(limits, lambda: _principal(token))
        except ratelimit.RateLimited as refusal:
            raise TooManyFailures(refusal) from None
        if principal is None:
            kind = "site token" if token.startswith(protocol.SITE_TOKEN_PREFIX) else "token"
            raise exceptions.AuthenticationFailed(f"unknown or revoked {kind}")
        return principal

    def authenticate_header(self, request):
        return self.keyword


def _principal(token: str) -> tuple[SiteAgent, Site] | tuple[object, PersonalToken] | None:
    if token.startswith(protocol.SITE_TOKEN_PREFIX):
        site = services.site_authenticate(token)
        return (SiteAgent(site), site) if site else None
    personal = (
        PersonalToken.objects.select_related("user")
        .filter(token_hash=token_hash(token), revoked_at__isnull=True, user__is_active=True)
        .first()
    )
    return (personal.user, personal) if personal else None


class IsSiteAgent(permissions.BasePermission):
    message = "this endpoint is for site agents: authenticate with the site's token"

    def has_permission(self, request, view):
        return isinstance(request.user, SiteAgent)


class IsPerson(permissions.BasePermission):
    message = "this endpoint is for people: sign in or use a personal token, not a site token"

    def has_permission(self, request, view):
        user = request.user
        return user is not None and user.is_authenticated and not isinstance(user, SiteAgent)


def touch_site(site: Site) -> None:
    """Agents' requests count as a heartbeat, at most every few seconds."""
    if site.last_seen_at is None or (timezone.now() - site.last_seen_at).total_seconds() > 5:
        services.site_heartbeat(site=site)


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = BearerTokenAuthentication
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A site token (site_...) for agents, or a personal token (user_...) for people.",
        }
