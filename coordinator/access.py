"""Who may see or do what. Every permission decision in views, the API and consumers is made here.

Roles (DESIGN section 2), all per object:
- coordinator: a user in ``federation.coordinators``: everything in that federation.
- site admin: a user in ``site.admins``: that site only (its tasks, metrics, budget, ledger);
  may lower the site's budget, never raise it.
- auditor: a user in ``federation.auditors``: reads that federation's ledger and audit events.
- superusers may do everything. A site's agent authenticates as the site, not as a user.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db.models import Q, QuerySet

from coordinator.models import Federation, Membership, Round, Site, Task


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
        Q(coordinators=user) | Q(auditors=user) | Q(memberships__site__admins=user)
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
    return Site.objects.filter(
        Q(created_by=user)
        | Q(admins=user)
        | Q(memberships__federation__coordinators=user)
        | Q(memberships__federation__auditors=user)
    ).distinct()


def can_view_site(user: Any, site: Site) -> bool:
    return sites_visible_to(user).filter(pk=site.pk).exists()


def can_manage_site(user: Any, site: Site) -> bool:
    """Rotate or revoke its token, add it to a federation: whoever registered it or coordinates it."""
    if _is_superuser(user):
        return True
    if not _is_user(user):
        return False
    return site.created_by_id == user.pk or site.memberships.filter(federation__coordinators=user).exists()


def can_register_site(user: Any) -> bool:
    return _is_superuser(user) or (
        _is_user(user) and (user.is_staff or user.coordinated_federations.exists())
    )


def can_view_membership(user: Any, membership: Membership) -> bool:
    return can_read_audit(user, membership.federation) or is_site_admin(user, membership.site)


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
