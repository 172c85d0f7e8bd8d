"""The dashboard's pages: server-rendered, each one checking access through coordinator.access.

Objects a user may not see answer 404 (so their existence does not leak); actions on objects
a user may see but not change answer 403.
"""

from __future__ import annotations

import csv
import json

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from coordinator import access, accounting, charts, privacy_preview, ratelimit, selectors, services
from coordinator.dashboard import queries
from coordinator.dashboard.forms import (
    BudgetForm,
    LaunchForm,
    LedgerFilterForm,
    MembershipAddForm,
    ReasonForm,
    SiteRegisterForm,
)
from coordinator.errors import NotAllowed, ServiceError
from coordinator.models import Federation, MembershipStatus, Round, Site
from sitesagent import accountant, protocol

# --- Shared helpers -----------------------------------------------------------------------------


def _require(allowed: bool) -> None:
    if not allowed:
        raise PermissionDenied


def _tabs(request, federation: Federation, tab: str) -> dict:
    """What every federation page needs for its tabs; the tabs show only what the user may use."""
    site_ids = access.site_ids_visible_in(request.user, federation)
    return {
        "federation": federation,
        "tab": tab,
        "can_coordinate": access.can_coordinate(request.user, federation),
        "can_read_audit": access.can_read_audit(request.user, federation),
        "scoped_to_own_sites": site_ids is not None,
    }


def _form_errors(form) -> str:
    return "; ".join(f"{name}: {' '.join(str(e) for e in errors)}" for name, errors in form.errors.items())


def _coordinated_federations(user):
    ids = [f.pk for f in access.federations_visible_to(user) if access.can_coordinate(user, f)]
    return Federation.objects.filter(pk__in=ids).order_by("name")


def _agent_command(request, token: str) -> str:
    server = request.build_absolute_uri("/").rstrip("/")
    return f"python -m sitesagent run --server {server} --token {token} --data /path/to/brats-cases"


def _show_token(request, site: Site, token: str, *, action: str) -> HttpResponse:
    """The one time a site's token is shown; never cached, never stored in clear."""
    response = render(
        request,
        "dashboard/site_token.html",
        {"site": site, "token": token, "command": _agent_command(request, token), "action": action},
    )
    response["Cache-Control"] = "no-store"
    return response


# --- Sign-in ------------------------------------------------------------------------------------


class SignInView(auth_views.LoginView):
    """Django's sign-in, answering 429 without checking the password once the client's address or
    the username has used up its failed sign-ins (coordinator.ratelimit)."""

    template_name = "login.html"

    def post(self, request, *args, **kwargs):
        username = request.POST.get("username", "")
        self.limits = ratelimit.sign_in_limits(ratelimit.http_client_address(request), username)
        try:
            ratelimit.check(self.limits)
        except ratelimit.RateLimited as refusal:
            form = self.get_form_class()(request, initial={"username": username})
            response = self.render_to_response(
                self.get_context_data(form=form, refusal=str(refusal)), status=429
            )
            response["Retry-After"] = str(refusal.retry_after)
            return response
        return super().post(request, *args, **kwargs)

    def form_invalid(self, form):
        if form.has_error(NON_FIELD_ERRORS, "invalid_login"):
            ratelimit.failure_record(self.limits)
        return super().form_invalid(form)


# --- Home ---------------------------------------------------------------------------------------


@login_required
def home(request):
    federations = access.federations_visible_to(request.user).order_by("name")
    cards = [
        {
            "federation": f,
            "role": _role(request.user, f),
            "latest_round": f.rounds.order_by("-number").first(),
            "latest_version": f.latest_version(),
            "n_sites": access.memberships_visible_to(request.user, f).count(),
        }
        for f in federations
    ]
    sites = access.sites_visible_to(request.user).filter(admins=request.user).order_by("name")
    return render(request, "dashboard/home.html", {"cards": cards, "own_sites": sites})


def _role(user, federation: Federation) -> str:
    if access.can_coordinate(user, federation):
        return "coordinator"
    if access.is_auditor(user, federation):
        return "auditor"
    return "site admin"


# --- Federation overview ------------------------------------------------------------------------


@login_required
def federation(request, pk: int):
    federation = access.federation_for(request.user, pk)
    site_ids = access.site_ids_visible_in(request.user, federation)
    memberships = access.memberships_visible_to(request.user, federation)
    dice = selectors.dice_points(federation, site_ids)
    title = "Federated Dice" if site_ids is None else "Dice of your site"
    figures = {
        "dice": charts.dice_over_rounds(dice, title=title),
        "heatmap": charts.dice_heatmap(dice),
        "epsilon": charts.epsilon_spent(queries.epsilon_commits(memberships)),
    }
    return render(
        request,
        "dashboard/federation.html",
        {
            **_tabs(request, federation, "overview"),
            "rounds": queries.rounds_of(federation),
            "versions": queries.versions_of(federation),
            "figures": figures,
        },
    )


# --- Budgets ------------------------------------------------------------------------------------


@login_required
def budgets(request, pk: int):
    federation = access.federation_for(request.user, pk)
    memberships = access.memberships_visible_to(request.user, federation)
    if request.method == "POST":
        return _budget_change(request, federation)
    rows = queries.budget_rows(memberships)
    for row in rows:
        row["can_change"] = access.can_change_budget(request.user, row["membership"])
        row["form"] = BudgetForm(
            initial={
                "membership": row["membership"].pk,
                "budget": row["budget"].normalize(),
                "allows_unprotected_sharing": row["membership"].allows_unprotected_sharing,
            },
            auto_id=f"id_%s_{row['membership'].pk}",
        )
    context = {**_tabs(request, federation, "budgets"), "rows": rows, "figure": charts.budget_bars(rows)}
    return render(request, "dashboard/budgets.html", context)


def _budget_change(request, federation: Federation):
    form = BudgetForm(request.POST)
    if not form.is_valid():
        messages.error(request, _form_errors(form))
        return redirect("dashboard-budgets", pk=federation.pk)
    membership = access.membership_for(request.user, form.cleaned_data["membership"])
    if membership.federation_id != federation.pk:
        raise Http404
    consent = form.cleaned_data["allows_unprotected_sharing"]
    try:
        budget = accounting.epsilon_from_input("budget", form.cleaned_data["budget"])
        refusal = access.budget_change_refusal(request.user, membership, budget)
        if refusal:
            raise NotAllowed(refusal)
        services.budget_set(
            membership=membership,
            budget=budget,
            changed_by=request.user,
            reason=form.cleaned_data["reason"],
            allows_unprotected_sharing=consent if access.can_coordinate(request.user, federation) else None,
        )
    except ServiceError as error:
        messages.error(request, f"Budget not changed: {error.message}.")
    else:
        messages.success(request, f"{membership.site}'s budget is now ε {queries.epsilon_text(budget)}.")
    return redirect("dashboard-budgets", pk=federation.pk)


# --- Launch -------------------------------------------------------------------------------------


def _launch_form(request, federation: Federation, data=None) -> LaunchForm:
    memberships = access.memberships_visible_to(request.user, federation).order_by("site__name")
    choices = [(m.site_id, _site_choice(m)) for m in memberships if m.status != MembershipStatus.LEFT]
    initial = LaunchForm.initial_for(federation, [site_id for site_id, _ in choices])
    return LaunchForm(data, initial=initial, site_choices=choices)


def _site_choice(membership) -> str:
    if membership.status == MembershipStatus.INVITED:
        return f"{membership.site.name} (invited, has not accepted: will be left out)"
    return membership.site.name


def _preview(federation: Federation, form: LaunchForm) -> dict:
    """The privacy preview of a launch form, or why there is none."""
    if not form.is_valid():
        return {"errors": [_form_errors(form)]}
    try:
        preview = privacy_preview.preview(federation=federation, **form.preview_kwargs())
    except ServiceError as error:
        return {"errors": [error.message]}
    preview.update(unprotected=preview["event"] is None, share_percent=100 * preview["share_released"])
    return {"preview": preview}


@login_required
def launch(request, pk: int):
    federation = access.federation_for(request.user, pk, need="coordinate")
    form = _launch_form(request, federation, request.POST if request.method == "POST" else None)
    if request.method == "POST" and request.POST.get("action") != "preview" and form.is_valid():
        try:
            round_ = _launch_rounds(request, federation, form)
        except ServiceError as error:
            form.add_error(None, error.message)
        else:
            return redirect("dashboard-round", pk=round_.pk)
    bound = form if form.is_bound else _launch_form(request, federation, _initial_data(form))
    return render(
        request,
        "dashboard/launch.html",
        {
            **_tabs(request, federation, "launch"),
            "form": form,
            "mechanism_params": protocol.MECHANISM_PARAMS,
            **_preview(federation, bound),
        },
    )


def _initial_data(form: LaunchForm) -> dict:
    """The unbound form's initial values as if they had been submitted, for the first preview."""
    data = {k: v for k, v in form.initial.items() if k != "sites" and v is not None}
    return {**data, "sites": [str(site) for site in form.initial.get("sites", [])]}


def _launch_rounds(request, federation: Federation, form: LaunchForm) -> Round:
    privacy_preview.check_noise(
        federation=federation, confirm_noise=form.cleaned_data["confirm_noise"], **form.preview_kwargs()
    )
    kwargs = form.launch_kwargs()
    count = form.cleaned_data["rounds"]
    if count > 1:
        round_ = services.federation_run_rounds(
            federation=federation, count=count, started_by=request.user, **kwargs
        )
    else:
        round_ = services.round_launch(federation=federation, launched_by=request.user, **kwargs)
    left_out = "; ".join(e["reason"] for e in round_.excluded_sites)
    note = f" Left out: {left_out}." if left_out else ""
    more = f" {count - 1} more will follow back to back." if count > 1 else ""
    messages.success(
        request, f"Round {round_.number} launched with {round_.tasks.count()} site(s).{note}{more}"
    )
    return round_


@login_required
@require_POST
def launch_preview(request, pk: int):
    """The preview panel alone, re-rendered as the launch form changes."""
    federation = access.federation_for(request.user, pk, need="coordinate")
    form = _launch_form(request, federation, request.POST)
    return render(request, "dashboard/_preview.html", _preview(federation, form))


# --- Live round ---------------------------------------------------------------------------------


def _round_figures(round_: Round, tasks) -> dict:
    """Loss and throughput per site so far; the page extends them from websocket messages."""
    return {
        key: charts.site_series(queries.round_series(round_, tasks, metric), metric=metric, title=title, y=y)
        for key, metric, title, y in [
            ("loss", protocol.METRIC_TRAIN_LOSS, "Training loss", "Dice loss"),
            ("throughput", protocol.METRIC_THROUGHPUT, "Throughput", "samples / s"),
        ]
    }


@login_required
def round_detail(request, pk: int):
    round_ = access.round_for(request.user, pk)
    federation = round_.federation
    tasks = list(access.tasks_visible_to(request.user, round_).order_by("site__name"))
    rows = queries.round_task_rows(round_, tasks)
    context = {
        **_tabs(request, federation, "rounds"),
        "round": round_,
        "rows": rows,
        "federated": queries.federated_row(rows),
        "excluded": access.excluded_sites_visible_to(request.user, round_),
        "figures": _round_figures(round_, tasks),
        "result_version": queries.result_versions(federation).get(round_.pk),
        "epsilon": queries.epsilon_text(round_.epsilon_per_site),
    }
    return render(request, "dashboard/round.html", context)


@login_required
@require_POST
def round_abort(request, pk: int):
    round_ = access.round_for(request.user, pk, need="coordinate")
    form = ReasonForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Give a reason to abort the round: it goes into the audit log.")
        return redirect("dashboard-round", pk=round_.pk)
    try:
        services.round_abort(round_=round_, aborted_by=request.user, reason=form.cleaned_data["reason"])
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"Round {round_.number} aborted; unspent reservations were released.")
    return redirect("dashboard-round", pk=round_.pk)


# --- Sites --------------------------------------------------------------------------------------


@login_required
def sites(request):
    can_register = access.can_register_site(request.user)
    federations = _coordinated_federations(request.user)
    form = SiteRegisterForm(request.POST or None, federations=federations)
    if request.method == "POST":
        _require(can_register)
        if form.is_valid():
            return _register(request, form)
    context = {"rows": _site_rows(request), "form": form if can_register else None}
    return render(request, "dashboard/sites.html", context)


def _site_rows(request) -> list[dict]:
    visible = (
        access.sites_visible_to(request.user).prefetch_related("memberships__federation").order_by("name")
    )
    federation_ids = set(access.federations_visible_to(request.user).values_list("pk", flat=True))
    return queries.site_rows(visible, federation_ids)


def _register(request, form: SiteRegisterForm) -> HttpResponse:
    data = form.cleaned_data
    try:
        site, token = services.site_register(name=data["name"], registered_by=request.user)
    except ServiceError as error:
        form.add_error("name", error.message)
        return render(request, "dashboard/sites.html", {"rows": _site_rows(request), "form": form})
    if data["federation"] is not None:
        try:
            services.membership_add(
                federation=data["federation"],
                site=site,
                budget=data["budget"],
                allows_unprotected_sharing=data["allows_unprotected_sharing"],
                added_by=request.user,
                reason=data["reason"],
            )
        except ServiceError as error:
            messages.error(
                request, f"{site} is registered but was not invited to {data['federation']}: {error.message}"
            )
        else:
            messages.info(request, _invited_note(site, data["federation"]))
    return _show_token(request, site, token, action="registered")


def _invited_note(site: Site, federation: Federation) -> str:
    return (
        f"{site} is invited to {federation}: it takes part once its admins accept on the site's page "
        "(while it has no admins, its registrant accepts)."
    )


@login_required
def site_detail(request, pk: int):
    site = access.site_for(request.user, pk)
    memberships = [
        m
        for m in site.memberships.select_related("federation", "site", "accepted_by")
        if access.can_view_membership(request.user, m)
    ]
    active = [m for m in memberships if m.is_active]
    joinable = _coordinated_federations(request.user).exclude(memberships__site=site)
    context = {
        "site": site,
        "row": queries.site_rows([site], {m.federation_id for m in active})[0],
        "memberships": memberships,
        "budget_rows": queries.budget_rows(active),
        "tasks": queries.site_tasks(site, [m.federation_id for m in active]),
        "can_manage": access.can_manage_site(request.user, site),
        "join_form": MembershipAddForm(federations=joinable) if joinable.exists() else None,
        "agent_info": json.dumps(site.agent_info, indent=2, sort_keys=True) if site.agent_info else "",
        "policy": queries.agent_policy(site.agent_info),
    }
    return render(request, "dashboard/site.html", context)


@login_required
@require_POST
def site_rotate(request, pk: int):
    site = access.site_for(request.user, pk, need="manage")
    try:
        token = services.site_token_rotate(site=site, rotated_by=request.user)
    except ServiceError as error:
        messages.error(request, error.message)
        return redirect("dashboard-site", pk=site.pk)
    return _show_token(request, site, token, action="rotated")


@login_required
@require_POST
def site_revoke(request, pk: int):
    site = access.site_for(request.user, pk, need="manage")
    form = ReasonForm(request.POST)
    reason = form.cleaned_data["reason"] if form.is_valid() else ""
    services.site_token_revoke(site=site, revoked_by=request.user, reason=reason)
    messages.success(request, f"{site}'s token is revoked: its agent can no longer connect.")
    return redirect("dashboard-site", pk=site.pk)


@login_required
@require_POST
def site_join(request, pk: int):
    site = access.site_for(request.user, pk)
    form = MembershipAddForm(request.POST, federations=_coordinated_federations(request.user))
    if not form.is_valid():
        messages.error(request, _form_errors(form))
        return redirect("dashboard-site", pk=site.pk)
    data = form.cleaned_data
    _require(access.can_coordinate(request.user, data["federation"]))
    try:
        services.membership_add(site=site, added_by=request.user, **data)
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, _invited_note(site, data["federation"]))
    return redirect("dashboard-site", pk=site.pk)


@login_required
@require_POST
def membership_accept(request, pk: int):
    membership = access.membership_for(request.user, pk, need="manage")
    try:
        services.membership_accept(membership=membership, accepted_by=request.user)
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(request, f"{membership.site} now takes part in {membership.federation}.")
    return redirect("dashboard-site", pk=membership.site_id)


@login_required
@require_POST
def membership_leave(request, pk: int):
    membership = access.membership_for(request.user, pk, need="manage")
    form = ReasonForm(request.POST)
    reason = form.cleaned_data["reason"] if form.is_valid() else ""
    try:
        services.membership_leave(membership=membership, left_by=request.user, reason=reason)
    except ServiceError as error:
        messages.error(request, error.message)
    else:
        messages.success(
            request, f"{membership.site} left {membership.federation}; its open reservations were released."
        )
    return redirect("dashboard-site", pk=membership.site_id)


# --- Privacy audit ------------------------------------------------------------------------------


def _ledger(request, federation: Federation):
    memberships = list(access.memberships_visible_to(request.user, federation))
    choices = sorted(((m.site_id, m.site.name) for m in memberships), key=lambda c: c[1])
    form = LedgerFilterForm(request.GET or None, site_choices=choices)
    return memberships, form, queries.ledger_rows(memberships, **form.filters())


@login_required
def privacy(request, pk: int):
    federation = access.federation_for(request.user, pk)
    memberships, form, rows = _ledger(request, federation)
    for row in rows:
        row["epsilon"] = queries.epsilon_text(row["entry"].epsilon)
        row["params"] = sorted(row["entry"].mechanism_params.items())
    context = {
        **_tabs(request, federation, "privacy"),
        "rows": rows,
        "filter_form": form,
        "query": request.GET.urlencode(),
        "bounds": queries.composition_rows(memberships),
        "accountant": accountant.accountant_name(),
    }
    return render(request, "dashboard/privacy.html", context)


@login_required
def privacy_export(request, pk: int, fmt: str):
    federation = access.federation_for(request.user, pk)
    if fmt not in ("csv", "json"):
        raise Http404
    _, _, rows = _ledger(request, federation)
    exported = queries.ledger_export(rows)
    filename = f"ledger-{federation.pk}.{fmt}"
    response: HttpResponse
    if fmt == "json":
        response = JsonResponse(exported, safe=False, json_dumps_params={"indent": 2})
    else:
        response = HttpResponse(content_type="text/csv; charset=utf-8")
        writer = csv.DictWriter(response, fieldnames=queries.EXPORT_FIELDS)
        writer.writeheader()
        for row in exported:
            writer.writerow({**row, "mechanism_params": json.dumps(row["mechanism_params"], sort_keys=True)})
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# --- Audit log ----------------------------------------------------------------------------------


@login_required
def audit_log(request, pk: int):
    federation = access.federation_for(request.user, pk, need="audit")
    action = request.GET.get("action") or None
    page = Paginator(queries.audit_events(federation, action=action), 100).get_page(request.GET.get("page"))
    rows = [(event, json.dumps(event.details, sort_keys=True) if event.details else "") for event in page]
    context = {
        **_tabs(request, federation, "audit"),
        "page": page,
        "rows": rows,
        "actions": queries.audit_actions(federation),
        "action": action,
    }
    return render(request, "dashboard/audit_log.html", context)
