"""Who may see or do what. Every permission decision in views, the API and consumers is made here.

Roles (DESIGN section 2), all per object:
- coordinator: a user in ``federation.coordinators``: everything in that federation, and its sites
  only through memberships they accepted (an invited site shows as "invited" and its name).
- site admin: a user in ``site.admins``: that site only (its tasks, metrics, budget, ledger);
  may lower the site's budget, never raise it; accepts or leaves federations for it, and rotates
  or revokes its token. A site's registrant (who received its first token) keeps those rights
  only while the site has no admins.
- auditor: a user in ``federation.auditors``: reads that federation's ledger and audit events.
- superusers may do everything. A site's agent authenticates as the site, not as a user.

Look-ups by id go through the ``*_for`` functions: whatever the caller may not see answers 404,
exactly like a missing id, so ids leak nothing; what they may see but not do answers 403.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import Http404

from coordinator.models import ACTIVE_MEMBERSHIP, Federation, Membership, ModelVersion, Round, Site, Task


def _is_user(user: Any) -> bool:
    """A signed-in person; a site agent's principal is never a user."""
    return (
        user is not None
        and getattr(user, "is_authenticated", False)
        and not getattr(user, "is_site_agent", False)
    )


def _is_superuser(user: Any) -> bool:
    return _is_user(user) and user.is_superuser


def federations_visible_to(user: Any) -> QuerySet[Federation]:
    if _is_superuser(user):
        return Federation.objects.all()
    if not _is_user(user):
        return Federation.objects.none()
    return Federation.objects.filter(
        Q(coordinators=user)
        | Q(auditors=user)
        | Q(
            memberships__site__admins=user,
            memberships__accepted_at__isnull=False,
            memberships__left_at__isnull=True,
        )
    ).distinct()


def is_coordinator(user: Any, federation: Federation) -> bool:
    return _is_superuser(user) or (_is_user(user) and federation.coordinators.filter(pk=user.pk).exists())


def is_auditor(user: Any, federation: Federation) -> bool:
    return _is_user(user) and federation.auditors.filter(pk=user.pk).exists()


def is_site_admin(user: Any, site: Site) -> bool:
    return _is_user(user) and site.admins.filter(pk=user.pk).exists()


def can_view_federation(user: Any, federation: Federation) -> bool:
    return federations_visible_to(user).filter(pk=federation.pk).exists()


def can_create_federation(user: Any) -> bool:
    return _is_user(user) and (user.is_superuser or user.is_staff)


def can_coordinate(user: Any, federation: Federation) -> bool:
    return is_coordinator(user, federation)


def can_read_audit(user: Any, federation: Federation) -> bool:
    """The whole federation's ledger and audit log: coordinators and auditors."""
    return is_coordinator(user, federation) or is_auditor(user, federation)


def sites_visible_to(user: Any) -> QuerySet[Site]:
    if _is_superuser(user):
        return Site.objects.all()
    if not _is_user(user):
        return Site.objects.none()
    active = Q(memberships__accepted_at__isnull=False, memberships__left_at__isnull=True)
    return Site.objects.filter(
        Q(created_by=user, admins__isnull=True)  # the registrant stands in until it has admins
        | Q(admins=user)
        | (active & Q(memberships__federation__coordinators=user))
        | (active & Q(memberships__federation__auditors=user))
    ).distinct()


def can_view_site(user: Any, site: Site) -> bool:
    return sites_visible_to(user).filter(pk=site.pk).exists()


def can_manage_site(user: Any, site: Site) -> bool:
    """Act for the site: rotate or revoke its token, accept or leave a federation.

    Its admins; its registrant (who received its first token) only while it has no admins;
    never a federation's coordinator as such.
    """
    if _is_superuser(user):
        return True
    if not _is_user(user):
        return False
    admins = site.admins.values_list("pk", flat=True)
    return user.pk in admins if admins else site.created_by_id == user.pk


def can_register_site(user: Any) -> bool:
    return _is_superuser(user) or (
        _is_user(user) and (user.is_staff or user.coordinated_federations.exists())
    )


def can_view_membership(user: Any, membership: Membership) -> bool:
    return can_read_audit(user, membership.federation) or can_manage_site(user, membership.site)


def memberships_visible_to(user: Any, federation: Federation) -> QuerySet[Membership]:
    memberships = federation.memberships.select_related("site")
    if can_read_audit(user, federation):
        return memberships
    if not _is_user(user):
        return memberships.none()
    return memberships.filter(site__admins=user)


def can_change_budget(user: Any, membership: Membership) -> bool:
    """Whether to offer a budget change at all; budget_change_refusal judges each new value."""
    return is_coordinator(user, membership.federation) or is_site_admin(user, membership.site)


def budget_change_refusal(user: Any, membership: Membership, new_budget: Decimal) -> str | None:
    """Why ``user`` may not set this budget, or None when they may."""
    if is_coordinator(user, membership.federation):
        return None
    if is_site_admin(user, membership.site):
        if new_budget <= membership.budget_epsilon:
            return None
        return "a site admin may lower the site's budget but never raise it"
    return "only the federation's coordinators or the site's admins may change this budget"


def can_view_round(user: Any, round_: Round) -> bool:
    return can_view_federation(user, round_.federation)


def tasks_visible_to(user: Any, round_: Round) -> QuerySet[Task]:
    tasks = round_.tasks.select_related("site")
    if can_read_audit(user, round_.federation):
        return tasks
    if not _is_user(user):
        return tasks.none()
    return tasks.filter(site__admins=user)


def excluded_sites_visible_to(user: Any, round_: Round) -> list[dict[str, Any]]:
    """The round's left-out sites with their reasons: these name balances, so a site admin sees
    only their own sites' entries."""
    site_ids = site_ids_visible_in(user, round_.federation)
    return [e for e in round_.excluded_sites if site_ids is None or e.get("site") in site_ids]


def site_ids_visible_in(user: Any, federation: Federation) -> set[int] | None:
    """The sites whose data ``user`` may see in ``federation``: None means all of them."""
    if can_read_audit(user, federation):
        return None
    if not _is_user(user):
        return set()
    return set(federation.memberships.filter(site__admins=user).values_list("site_id", flat=True))


def navigation(request: Any) -> dict[str, Any]:
    """Template context: which parts of the dashboard the signed-in user may use."""
    user: Any = getattr(request, "user", None)
    if not _is_user(user):
        return {"nav": {}}
    coordinates = _is_superuser(user) or user.coordinated_federations.exists()
    audits = coordinates or user.audited_federations.exists()
    return {
        "nav": {
            "coordinator": coordinates,
            "auditor": audits,
            "site_admin": user.administered_sites.exists(),
            "can_register_site": can_register_site(user),
        }
    }


# --- Look-ups by id: 404 for what the caller may not see, 403 for what they may not do ---------


def _refuse_unless(allowed: bool, message: str) -> None:
    if not allowed:
        raise PermissionDenied(message)


def federation_for(user: Any, pk: int, *, need: str = "view") -> Federation:
    """``need``: "view", "coordinate" (launch, add sites), or "audit" (the audit log)."""
    federation = federations_visible_to(user).filter(pk=pk).first()
    if federation is None:
        raise Http404
    if need == "coordinate":
        _refuse_unless(can_coordinate(user, federation), "only the federation's coordinators may do this")
    elif need == "audit":
        _refuse_unless(
            can_read_audit(user, federation), "only coordinators and auditors may read the audit log"
        )
    return federation


def site_for(user: Any, pk: int, *, need: str = "view") -> Site:
    """``need``: "view", or "manage" (act for the site: its token, its memberships)."""
    site = sites_visible_to(user).filter(pk=pk).first()
    if site is None:
        raise Http404
    if need == "manage":
        _refuse_unless(
            can_manage_site(user, site),
            "only the site's admins may do this (its registrant, while it has no admins)",
        )
    return site


def round_for(user: Any, pk: int, *, need: str = "view") -> Round:
    """``need``: "view", or "coordinate" (abort)."""
    round_ = Round.objects.select_related("federation", "base_version", "launched_by").filter(pk=pk).first()
    if round_ is None or not can_view_round(user, round_):
        raise Http404
    if need == "coordinate":
        _refuse_unless(
            can_coordinate(user, round_.federation), "only the federation's coordinators may do this"
        )
    return round_


def membership_for(user: Any, pk: int, *, need: str = "view") -> Membership:
    """``need``: "view", or "manage" (accept or leave, for the site)."""
    membership = Membership.objects.select_related("site", "federation").filter(pk=pk).first()
    if membership is None or not can_view_membership(user, membership):
        raise Http404
    if need == "manage":
        _refuse_unless(
            can_manage_site(user, membership.site),
            "only the site's admins may accept or leave a federation for it",
        )
    return membership


def task_for_site(site: Site, pk: int) -> Task:
    """One of ``site``'s own tasks; another site's answers 404 like a missing one."""
    task = (
        Task.objects.select_related("round__federation", "round__base_version", "site")
        .filter(pk=pk, site=site)
        .first()
    )
    if task is None:
        raise Http404
    return task


def version_for(principal: Any, pk: int) -> ModelVersion:
    """A model version, for people who may see its federation and for the agents of the sites
    that take part in it (an accepted membership)."""
    version = ModelVersion.objects.select_related("federation").filter(pk=pk).first()
    if version is None:
        raise Http404
    if getattr(principal, "is_site_agent", False):
        allowed = version.federation.memberships.filter(ACTIVE_MEMBERSHIP, site=principal.site).exists()
    else:
        allowed = can_view_federation(principal, version.federation)
    if not allowed:
        raise Http404
    return version
