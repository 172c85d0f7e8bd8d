"""Reads that several views, the API and the services share (balances: coordinator.accounting)."""

from __future__ import annotations

from typing import Any

from django.db.models import Exists, OuterRef

from coordinator.models import (
    ACTIVE_MEMBERSHIP,
    Federation,
    Membership,
    MetricPoint,
    Round,
    RoundState,
    Task,
    TaskState,
    Update,
)
from sitesagent import protocol


def next_task_for(site_id: int) -> Task | None:
    """The oldest task of this site that still waits for work, in an open round of a federation
    the site takes part in (it accepted, and has not left)."""
    takes_part = Membership.objects.filter(
        ACTIVE_MEMBERSHIP, site_id=site_id, federation_id=OuterRef("round__federation_id")
    )
    return (
        Task.objects.filter(
            Exists(takes_part),
            site_id=site_id,
            state__in=[TaskState.ASSIGNED, TaskState.EVALUATING, TaskState.TRAINING],
            round__state__in=[RoundState.RESERVED, RoundState.TRAINING],
        )
        .select_related("round", "round__base_version", "round__federation")
        .order_by("round__launched_at", "id")
        .first()
    )


def dice_points(
    federation: Federation, site_ids: set[int] | None = None, *, round_: Round | None = None
) -> list[dict[str, Any]]:
    """The latest Dice each site reported per round, with the case count that weighs it.

    The weight is the case count of the site's update in that round (Update.n_cases), else what
    its agent last said (site.agent_info["cases"]). ``site_ids`` limits it to those sites
    (None: all), ``round_`` to one round. charts.federated_dice averages them.
    """
    metrics = MetricPoint.objects.filter(
        federation=federation, name__in=protocol.METRIC_DICE, round__isnull=False, site__isnull=False
    ).select_related("round", "site")
    if site_ids is not None:
        metrics = metrics.filter(site_id__in=site_ids)
    if round_ is not None:
        metrics = metrics.filter(round=round_)
    update_cases = {
        (round_id, site_id): n_cases
        for round_id, site_id, n_cases in Update.objects.filter(
            task__round__federation=federation
        ).values_list("task__round_id", "task__site_id", "n_cases")
    }
    latest: dict[tuple[Any, Any, str], MetricPoint] = {}
    for point in metrics.order_by("id"):
        latest[(point.round_id, point.site_id, point.name)] = point
    rows = []
    for point in latest.values():
        round_, site = point.round, point.site
        assert round_ is not None and site is not None  # the query excludes the others
        rows.append(
            {
                "round": round_.number,
                "site": site.name,
                "name": point.name,
                "value": point.value,
                "cases": update_cases.get((round_.pk, site.pk)) or case_count(site.agent_info),
            }
        )
    return rows


def case_count(info: dict[str, Any] | None) -> int | None:
    """The number of cases an agent says it has, when it said a usable one."""
    cases = (info or {}).get("cases")
    if isinstance(cases, bool) or not isinstance(cases, int | float) or cases < 1:
        return None
    return int(cases)
