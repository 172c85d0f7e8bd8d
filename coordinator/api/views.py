"""The HTTP API: thin functions that check access, call one service or selector, and answer."""

from __future__ import annotations

from django.http import FileResponse, HttpResponse
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework.decorators import api_view, parser_classes, permission_classes
from rest_framework.parsers import BaseParser
from rest_framework.response import Response

from coordinator import access, accounting, privacy_preview, selectors, services, storage, throttle
from coordinator.api import serializers as s
from coordinator.api.auth import IsPerson, IsSiteAgent, touch_site
from coordinator.errors import NotAllowed
from coordinator.models import AuditEvent, LedgerEntry, Task

PERSON = [IsPerson]
AGENT = [IsSiteAgent]


def _require(allowed: bool, message: str) -> None:
    if not allowed:
        raise NotAllowed(message)


# --- Federations -----------------------------------------------------------------------------


@extend_schema(request=s.FederationCreateSerializer, responses=s.FederationSerializer(many=True))
@api_view(["GET", "POST"])
@permission_classes(PERSON)
def federations(request):
    if request.method == "GET":
        return Response(s.FederationSerializer(access.federations_visible_to(request.user), many=True).data)
    _require(access.can_create_federation(request.user), "only staff may create federations")
    data = _valid(s.FederationCreateSerializer, request)
    federation = services.federation_create(created_by=request.user, **data)
    return Response(s.FederationSerializer(federation).data, status=201)


@extend_schema(responses=s.FederationSerializer)
@api_view(["GET"])
@permission_classes(PERSON)
def federation_detail(request, pk: int):
    return Response(s.FederationSerializer(access.federation_for(request.user, pk)).data)


def _valid(serializer_class, request) -> dict:
    serializer = serializer_class(data=request.data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


# --- Sites -------------------------------------------------------------------------------------


@extend_schema(
    request=s.NameSerializer, responses={200: s.SiteSerializer(many=True), 201: s.SiteWithTokenSerializer}
)
@api_view(["GET", "POST"])
@permission_classes(PERSON)
def sites(request):
    if request.method == "GET":
        return Response(s.SiteSerializer(access.sites_visible_to(request.user), many=True).data)
    _require(access.can_register_site(request.user), "only coordinators may register sites")
    site, token = services.site_register(
        name=_valid(s.NameSerializer, request)["name"], registered_by=request.user
    )
    return Response({"site": s.SiteSerializer(site).data, "token": token}, status=201)


@extend_schema(responses=s.SiteSerializer)
@api_view(["GET"])
@permission_classes(PERSON)
def site_detail(request, pk: int):
    return Response(s.SiteSerializer(access.site_for(request.user, pk)).data)


@extend_schema(request=None, responses=s.SiteWithTokenSerializer)
@api_view(["POST"])
@permission_classes(PERSON)
def site_rotate_token(request, pk: int):
    site = access.site_for(request.user, pk, need="manage")
    token = services.site_token_rotate(site=site, rotated_by=request.user)
    return Response({"site": s.SiteSerializer(site).data, "token": token})


@extend_schema(request=s.ReasonSerializer, responses=s.SiteSerializer)
@api_view(["POST"])
@permission_classes(PERSON)
def site_revoke(request, pk: int):
    site = access.site_for(request.user, pk, need="manage")
    services.site_token_revoke(
        site=site, revoked_by=request.user, reason=_valid(s.ReasonSerializer, request)["reason"]
    )
    return Response(s.SiteSerializer(site).data)


# --- Memberships and budgets ------------------------------------------------------------------


@extend_schema(request=s.MembershipCreateSerializer, responses=s.MembershipSerializer(many=True))
@api_view(["GET", "POST"])
@permission_classes(PERSON)
def memberships(request, pk: int):
    """GET: the memberships the caller may see. POST: invite a site the caller may see; the site
    takes part once its admins accept (POST /api/memberships/<id>/accept/)."""
    if request.method == "GET":
        federation = access.federation_for(request.user, pk)
        visible = list(access.memberships_visible_to(request.user, federation))
        return Response(_memberships_data(visible, many=True))
    federation = access.federation_for(request.user, pk, need="coordinate")
    data = _valid(s.MembershipCreateSerializer, request)
    site = access.site_for(request.user, data.pop("site"))
    membership = services.membership_add(federation=federation, site=site, added_by=request.user, **data)
    return Response(_memberships_data(membership), status=201)


def _memberships_data(memberships, *, many: bool = False):
    """Balances come from the ledger, which only a site that accepted has."""
    listed = memberships if many else [memberships]
    context = {"balances": accounting.balances_for(m for m in listed if m.is_active)}
    return s.MembershipSerializer(memberships, many=many, context=context).data


@extend_schema(request=s.BudgetChangeSerializer, responses=s.MembershipSerializer)
@api_view(["GET", "PATCH"])
@permission_classes(PERSON)
def membership_detail(request, pk: int):
    membership = access.membership_for(request.user, pk)
    if request.method == "PATCH":
        data = _valid(s.BudgetChangeSerializer, request)
        new_budget = accounting.epsilon_from_input("budget", data["budget"])
        refusal = access.budget_change_refusal(request.user, membership, new_budget)
        _require(refusal is None, refusal or "")
        membership = services.budget_set(membership=membership, changed_by=request.user, **data)
    return Response(_memberships_data(membership))


@extend_schema(request=None, responses=s.MembershipSerializer)
@api_view(["POST"])
@permission_classes(PERSON)
def membership_accept(request, pk: int):
    """The site's admins accept its invitation: from now on it gets this federation's tasks."""
    membership = access.membership_for(request.user, pk, need="manage")
    membership = services.membership_accept(membership=membership, accepted_by=request.user)
    return Response(_memberships_data(membership))


@extend_schema(request=s.ReasonSerializer, responses=s.MembershipSerializer)
@api_view(["POST"])
@permission_classes(PERSON)
def membership_leave(request, pk: int):
    """The site leaves (or declines): unfinished tasks dropped, reservations released, ledger kept."""
    membership = access.membership_for(request.user, pk, need="manage")
    reason = _valid(s.ReasonSerializer, request)["reason"]
    membership = services.membership_leave(membership=membership, left_by=request.user, reason=reason)
    return Response(_memberships_data(membership))


# --- Rounds -------------------------------------------------------------------------------------


@extend_schema(request=s.RoundLaunchSerializer, responses=s.RoundSerializer(many=True))
@api_view(["GET", "POST"])
@permission_classes(PERSON)
def rounds(request, pk: int):
    if request.method == "GET":
        federation = access.federation_for(request.user, pk)
        rounds = federation.rounds.order_by("-number")
        return Response(s.RoundSerializer(rounds, many=True, context={"user": request.user}).data)
    federation = access.federation_for(request.user, pk, need="coordinate")
    data = _valid(s.RoundLaunchSerializer, request)
    privacy_preview.check_noise(federation=federation, **data)
    data.pop("confirm_noise")
    round_ = services.round_launch(
        federation=federation, launched_by=request.user, site_ids=data.pop("sites"), **data
    )
    return Response(s.RoundSerializer(round_, context={"user": request.user}).data, status=201)


@extend_schema(
    request=s.RoundLaunchSerializer, responses=OpenApiResponse(description="Per-site privacy preview")
)
@api_view(["POST"])
@permission_classes(PERSON)
def round_preview(request, pk: int):
    federation = access.federation_for(request.user, pk, need="coordinate")
    data = _valid(s.RoundLaunchSerializer, request)
    return Response(privacy_preview.preview(federation=federation, **data))


@extend_schema(responses=s.RoundSerializer)
@api_view(["GET"])
@permission_classes(PERSON)
def round_detail(request, pk: int):
    round_ = access.round_for(request.user, pk)
    tasks = access.tasks_visible_to(request.user, round_)
    data = s.RoundSerializer(round_, context={"user": request.user}).data
    return Response({**data, "tasks": s.TaskSerializer(tasks, many=True).data})


@extend_schema(request=s.ReasonSerializer, responses=s.RoundSerializer)
@api_view(["POST"])
@permission_classes(PERSON)
def round_abort(request, pk: int):
    round_ = access.round_for(request.user, pk, need="coordinate")
    round_ = services.round_abort(
        round_=round_, aborted_by=request.user, reason=_valid(s.ReasonSerializer, request)["reason"]
    )
    return Response(s.RoundSerializer(round_, context={"user": request.user}).data)


@extend_schema(responses=s.ModelVersionSerializer(many=True))
@api_view(["GET"])
@permission_classes(PERSON)
def versions(request, pk: int):
    federation = access.federation_for(request.user, pk)
    return Response(s.ModelVersionSerializer(federation.versions.order_by("number"), many=True).data)


@extend_schema(
    responses={(200, "application/octet-stream"): OpenApiResponse(description="safetensors weights")}
)
@api_view(["GET"])
def version_weights(request, pk: int):
    """A model version's weights, for people who may see the federation and for the agents of the
    sites that take part in it."""
    version = access.version_for(request.user, pk)
    if getattr(request.user, "is_site_agent", False):
        touch_site(request.user.site)
    response = FileResponse(storage.path_of(version.path).open("rb"), content_type="application/octet-stream")
    response["Content-Disposition"] = (
        f'attachment; filename="{version.federation.name}-v{version.number}.safetensors"'
    )
    response["X-Content-SHA256"] = version.sha256
    return response


# --- Ledger and audit ---------------------------------------------------------------------------


def _ledger_rows(entries, memberships):
    entries = entries.select_related("membership__site", "round__launched_by").order_by("id")
    return accounting.ledger_with_balances(entries, memberships)


@extend_schema(responses=s.LedgerEntrySerializer(many=True))
@api_view(["GET"])
@permission_classes(PERSON)
def federation_ledger(request, pk: int):
    federation = access.federation_for(request.user, pk)
    visible = list(access.memberships_visible_to(request.user, federation))
    entries = LedgerEntry.objects.filter(membership__in=visible)
    return Response(s.LedgerEntrySerializer(_ledger_rows(entries, visible), many=True).data)


@extend_schema(responses=s.LedgerEntrySerializer(many=True))
@api_view(["GET"])
@permission_classes(PERSON)
def membership_ledger(request, pk: int):
    membership = access.membership_for(request.user, pk)
    rows = _ledger_rows(LedgerEntry.objects.filter(membership=membership), [membership])
    return Response(s.LedgerEntrySerializer(rows, many=True).data)


@extend_schema(responses=s.AuditEventSerializer(many=True))
@api_view(["GET"])
@permission_classes(PERSON)
def federation_audit(request, pk: int):
    federation = access.federation_for(request.user, pk, need="audit")
    events = AuditEvent.objects.filter(federation=federation).select_related("actor", "actor_site")
    return Response(s.AuditEventSerializer(events, many=True).data)


@extend_schema(request=s.NameSerializer, responses=OpenApiResponse(description="The token, shown once"))
@api_view(["POST"])
@permission_classes(PERSON)
def personal_tokens(request):
    token = services.personal_token_create(user=request.user, name=_valid(s.NameSerializer, request)["name"])
    return Response({"token": token}, status=201)


# --- The agent's side ---------------------------------------------------------------------------


def _agent_task(request, pk: int) -> Task:
    task = access.task_for_site(request.user.site, pk)
    touch_site(request.user.site)
    return task


@extend_schema(responses={200: s.AgentTaskSerializer, 204: None})
@api_view(["GET"])
@permission_classes(AGENT)
def agent_next_task(request):
    touch_site(request.user.site)
    task = selectors.next_task_for(request.user.site.pk)
    if task is None:
        return Response(status=204)
    return Response(s.AgentTaskSerializer(task).data)


@extend_schema(responses=s.AgentTaskSerializer)
@api_view(["GET"])
@permission_classes(AGENT)
def agent_task(request, pk: int):
    return Response(s.AgentTaskSerializer(_agent_task(request, pk)).data)


@extend_schema(request=s.TaskStatusSerializer, responses=s.TaskSerializer)
@api_view(["POST"])
@permission_classes(AGENT)
def agent_task_status(request, pk: int):
    task = services.task_report(task=_agent_task(request, pk), **_valid(s.TaskStatusSerializer, request))
    return Response(s.TaskSerializer(task).data)


@extend_schema(
    request=s.MetricsSerializer,
    responses={
        200: OpenApiResponse(description="How many points were stored"),
        429: OpenApiResponse(description="Over the site's metrics rate; nothing stored"),
    },
)
@api_view(["POST"])
@permission_classes(AGENT)
def agent_task_metrics(request, pk: int):
    task = _agent_task(request, pk)
    throttle.metrics_request_check(task.site_id)
    stored = services.metrics_record(task=task, points=_valid(s.MetricsSerializer, request)["points"])
    return Response({"stored": stored})


class RawBytesParser(BaseParser):
    media_type = "application/octet-stream"

    def parse(self, stream, media_type=None, parser_context=None):
        return stream.read()


@extend_schema(
    request={"application/octet-stream": {"type": "string", "format": "binary"}},
    responses={
        200: OpenApiResponse(description="the stored update"),
        422: OpenApiResponse(description="rejected"),
    },
)
@api_view(["PUT"])
@permission_classes(AGENT)
@parser_classes([RawBytesParser])
def agent_task_update(request, pk: int):
    # DRF hands an empty body over as {}, not b"": it is still an upload, just not an update.
    data = request.data if isinstance(request.data, bytes) else b""
    update = services.update_accept(task=_agent_task(request, pk), data=data)
    return Response({"update": update.pk, "sha256": update.sha256, "status": update.status})


@extend_schema(request=s.HeartbeatSerializer, responses=s.SiteSerializer)
@api_view(["POST"])
@permission_classes(AGENT)
def agent_heartbeat(request):
    services.site_heartbeat(site=request.user.site, info=_valid(s.HeartbeatSerializer, request)["info"])
    return Response(s.SiteSerializer(request.user.site).data)


def healthz(request):
    return HttpResponse("ok", content_type="text/plain")
